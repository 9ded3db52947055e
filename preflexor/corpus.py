"""Documents and token-aware chunks: a folder of .txt/.md, a .jsonl with a `text` field, or the embedded ontologies.

PRefLexOR builds its training data "in situ": random chunks seed a question and retrieval over all chunks enriches
it (arXiv 2410.12375, §2). The embedded default is a deterministic biology/materials slice of the UBERON, CL, PATO
and ChEBI definitions in the `cellxgene-ontology-guide` wheel (licences in data/README.md): one document per term,
"label: definition", with synonyms and ancestors in `meta` for graph.py's typed edges.
"""
from __future__ import annotations

import bisect
import hashlib
import html
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from preflexor.errors import UserError
from preflexor.utils import json_line

ONTOLOGIES = ("UBERON", "CL", "PATO", "CHEBI")

# A keyword matches at a word start; it must match the whole word unless it ends with "*" (prefix).
BIO_KEYWORDS = (
    "bone*", "cartilag*", "tendon*", "ligament*", "collagen*", "keratin*", "chitin*", "silk", "enamel*", "dentin*",
    "mineral*", "elastic*", "elastin", "stiff*", "hard", "hardness", "fibr*", "nacre", "shell*", "tooth", "teeth",
    "skelet*", "osteo*", "chondr*", "ossif*", "calcif*", "hydroxyapatite", "tensile", "tough*", "strength",
    "extracellular matrix", "feather*", "hair*", "horn", "horns", "hoof", "hooves", "claw*", "beak*", "cuticle*",
    "scale", "scales", "cellulose", "lignin", "viscoelastic*", "viscosity", "brittle*", "plasticity", "rigid*",
    "flexib*", "fractur*", "compressi*", "porous", "porosity", "density", "mechanical*",
)
# ChEBI is matched on labels only: its definitions use chemistry's own vocabulary ("carbon skeleton", "strain").
CHEBI_KEYWORDS = (
    "collagen*", "keratin*", "chitin", "chitosan", "cellulose", "lignin", "fibroin", "sericin", "elastin", "resilin",
    "hydroxyapatite", "apatite", "calcite", "aragonite", "vaterite", "calcium carbonate", "calcium phosphate",
    "mineral", "silica", "silicon dioxide", "polysaccharide", "glycosaminoglycan", "chondroitin*", "hyaluronic acid",
    "pectin", "hemicellulose", "cutin*", "suberin", "sporopollenin", "melanin*", "biopolymer", "polymer", "glass",
    "ceramic", "alloy", "amyloid*", "gelatin", "starch", "glycogen", "wax", "alginate", "agarose", "carrageenan",
    "keratan sulfate", "dermatan sulfate", "heparan sulfate", "fibre", "fiber",
)
DEFAULT_KEYWORDS: dict[str, tuple[str, ...]] = {"UBERON": BIO_KEYWORDS, "CL": BIO_KEYWORDS, "PATO": BIO_KEYWORDS,
                                                "CHEBI": CHEBI_KEYWORDS}
_LABEL_ONLY = {"CHEBI"}
# drug roles and reagents are not materials even when their label names one ("calcium channel blocker")
_CHEBI_EXCLUDE = re.compile(r"inhibitor|agonist|antagonist|blocker|modulator|receptor|degrader|channel|allergen", re.I)
_PLAIN_LABEL = re.compile(r"^[A-Za-z][A-Za-z ,'\-]*$")  # skips systematic names like "poly[(1->4)-...]"
# The uncapped keyword slice has 5,750 documents; 2,500 keep the dense index build short on 2 CPU cores.
DEFAULT_MAX_TERMS = 2500
_SLICE_VERSION = 2  # bump when the slicing rule changes, to invalidate cached slices


@dataclass
class Document:
    doc_id: str
    text: str
    title: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class Chunk:
    chunk_id: str
    doc_id: str
    text: str
    title: str = ""
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# loading


def load_documents(source: str | Path) -> list[Document]:
    """Documents from "ontology" (the embedded default), a folder or a .jsonl file. Folder: every .txt/.md below it
    (sorted, hidden skipped), doc_id = relative path. JSONL: objects with a string `text`, optional `id` (default
    "<file stem>:<line>") and `title`, other keys in `meta`; a bad line raises UserError naming file:line."""
    if str(source) == "ontology":
        return load_ontology()
    path = Path(source)
    if not path.exists():
        raise UserError(f"corpus source {path} does not exist (expected a folder, a .jsonl file or 'ontology')")
    if path.is_dir():
        return _load_folder(path)
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    raise UserError(f"corpus source {path}: expected a folder of .txt/.md, a .jsonl file or 'ontology'")


def _load_folder(root: Path) -> list[Document]:
    docs = []
    for p in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".md")
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)):
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.strip():
            continue
        first = text.lstrip().splitlines()[0]
        title = first.lstrip("#").strip() if p.suffix == ".md" and first.startswith("#") else p.stem
        docs.append(Document(p.relative_to(root).as_posix(), text, title, str(p), {}))
    if not docs:
        raise UserError(f"corpus folder {root} has no non-empty .txt or .md files")
    return docs


def _load_jsonl(path: Path) -> list[Document]:
    docs, seen = [], set()
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json_line(line)
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f"{where}: expected an object with a string 'text' field")
            doc_id = str(obj.get("id", f"{path.stem}:{lineno}"))
            if doc_id in seen:
                raise UserError(f"{where}: duplicate id {doc_id!r}")
            seen.add(doc_id)
            title = obj.get("title", "")
            if not isinstance(title, str):
                raise UserError(f"{where}: 'title' must be a string")
            meta = {k: v for k, v in obj.items() if k not in ("id", "text", "title")}
            docs.append(Document(doc_id, obj["text"], title, where, meta))
    if not docs:
        raise UserError(f"{path}: no documents")
    return docs


# ---------------------------------------------------------------------------------------------------------------
# the embedded ontology corpus


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version))


def ontology_files(data_dir: Path | None = None) -> dict[str, tuple[str, Path]]:
    """Newest `{ONT}-ontology-{version}.json.zst` per ontology in the package data folder: {ONT: (version, path)}."""
    from preflexor.assets import ontology_data_dir

    data_dir = data_dir or ontology_data_dir()
    newest: dict[str, tuple[str, Path]] = {}
    for p in sorted(data_dir.glob("*-ontology-*.json.zst")):
        name, version = p.name[: -len(".json.zst")].split("-ontology-", 1)
        if name not in newest or _version_key(version) > _version_key(newest[name][0]):
            newest[name] = (version, p)
    return newest


def _read_zst_json(path: Path) -> dict:
    import zstandard

    with open(path, "rb") as f:
        return json.loads(zstandard.ZstdDecompressor().stream_reader(f).read())


def _plain_text(text: str) -> str:
    """ChEBI definitions carry HTML markup ("1<em>H</em>-indazole", "&amp;"): keep the text, one-space separated."""
    return " ".join(html.unescape(re.sub(r"</?[A-Za-z][^<>]*>", "", text)).split())


def _keyword_regex(keywords: Sequence[str]) -> re.Pattern:
    alts = [re.escape(k[:-1]) if k.endswith("*") else re.escape(k) + r"\b" for k in keywords]
    return re.compile(r"\b(?:" + "|".join(alts) + ")", re.IGNORECASE)


def _id_key(term_id: str) -> tuple[str, int, str]:
    prefix, _, local = term_id.partition(":")
    return (prefix, int(local) if local.isdigit() else -1, local)


def _select_terms(raw: Mapping[str, dict], ontologies: Sequence[str],
                  keywords: Mapping[str, Sequence[str]] | Sequence[str] | None, max_terms: int | None) -> list[str]:
    """Keyword hits plus all their in-corpus ancestors (so is_a chains reach the roots), in a fixed order."""
    described = {t for t, v in raw.items() if not v.get("deprecated") and v.get("label") and v.get("description")}
    order = {o: i for i, o in enumerate(ontologies)}
    sort_key = lambda t: (order[raw[t]["_ontology"]], _id_key(t))  # noqa: E731
    if keywords is None:
        hits = sorted(described, key=sort_key)
    else:
        per_ont = {o: keywords.get(o) if isinstance(keywords, Mapping) else keywords for o in ontologies}
        regex = {o: _keyword_regex(k) for o, k in per_ont.items() if k}
        score = {}
        for t in described:
            ont, v = raw[t]["_ontology"], raw[t]
            if ont not in regex:
                continue
            if ont in _LABEL_ONLY:
                if not _PLAIN_LABEL.match(v["label"]) or _CHEBI_EXCLUDE.search(v["label"]):
                    continue
                found = regex[ont].findall(v["label"])
            else:
                found = regex[ont].findall(v["label"] + " " + v["description"])
            if found:
                score[t] = len({f.lower() for f in found})
        # Within an ontology the most keyword-rich terms come first ("bone tissue" before each named bone); the
        # ontologies then take turns, so a cap keeps the core of every ontology rather than only UBERON's.
        ranked = [sorted((t for t in score if raw[t]["_ontology"] == o), key=lambda t: (-score[t], sort_key(t)))
                  for o in ontologies]
        hits = [r[i] for i in range(max(map(len, ranked), default=0)) for r in ranked if i < len(r)]
    chosen: dict[str, None] = {}
    for t in hits:
        group = [g for g in [t] + sorted(raw[t].get("ancestors", {}), key=sort_key)
                 if g in described and g not in chosen]
        if max_terms is not None and len(chosen) + len(group) > max_terms:
            continue  # a smaller group further down may still fit
        chosen.update(dict.fromkeys(group))
    return sorted(chosen, key=sort_key)


def load_ontology(ontologies: Sequence[str] = ONTOLOGIES,
                  keywords: Mapping[str, Sequence[str]] | Sequence[str] | None = DEFAULT_KEYWORDS,
                  max_terms: int | None = DEFAULT_MAX_TERMS, use_cache: bool = True) -> list[Document]:
    """The embedded corpus: one Document per non-deprecated, defined term in the slice, doc_id = term id, text =
    "label: definition", title = label, meta = {term_id, label, synonyms, ancestors {id: distance} within the slice,
    ontology, version}.

    Args:
        ontologies: names as in the package file names (the newest version of each is used).
        keywords: per-ontology keyword lists, or one list for all, or None for every defined term. A term whose
            label or definition (ChEBI: label) matches is taken with all its ancestors.
        max_terms: document cap (None: none); the most keyword-rich hits first, the ontologies taking turns.
        use_cache: keep the slice as JSON under the cache dir, keyed by package version and arguments.
    """
    from preflexor.assets import cache_dir, package_version
    from preflexor.utils import atomic_write_json

    files = ontology_files()
    missing = [o for o in ontologies if o not in files]
    if missing:
        raise UserError(f"ontologies {missing} not in the cellxgene-ontology-guide data (have {sorted(files)})")
    kw = {k: list(v) for k, v in keywords.items()} if isinstance(keywords, Mapping) else \
        (list(keywords) if keywords is not None else None)
    spec = {"slice": _SLICE_VERSION, "package": package_version("cellxgene-ontology-guide"),
            "files": [files[o][1].name for o in ontologies], "keywords": kw, "max_terms": max_terms}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    cache_path = cache_dir() / "corpus" / f"ontology-{key}.json"
    if use_cache and cache_path.is_file():
        try:
            cached = json.loads(cache_path.read_text(encoding="utf-8"))
            if cached.get("spec") == spec:
                return [Document(**d) for d in cached["documents"]]
        except (json.JSONDecodeError, TypeError, KeyError):
            pass  # a damaged cache is rebuilt below
    raw: dict[str, dict] = {}
    for o in ontologies:
        for t, v in _read_zst_json(files[o][1]).items():
            if t not in raw:
                raw[t] = {**v, "_ontology": o, "_version": files[o][0]}
    keep = _select_terms(raw, list(ontologies), keywords, max_terms)
    in_slice = set(keep)
    docs = []
    for t in keep:
        v = raw[t]
        label, desc = v["label"].strip(), _plain_text(v["description"])
        ancestors = {a: int(d) for a, d in sorted(v.get("ancestors", {}).items(), key=lambda x: (x[1], _id_key(x[0])))
                     if a in in_slice}
        meta = {"term_id": t, "label": label, "synonyms": sorted(set(s.strip() for s in v.get("synonyms", []) or [])
                                                                  - {label, ""}),
                "ancestors": ancestors, "ontology": v["_ontology"], "version": v["_version"]}
        docs.append(Document(t, f"{label}: {desc}", label, f"{v['_ontology']} {v['_version']}", meta))
    if use_cache:
        atomic_write_json(cache_path, {"spec": spec, "documents": [d.__dict__ for d in docs]}, indent=None)
    return docs


# ---------------------------------------------------------------------------------------------------------------
# chunking


_WORD_TOKEN = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def word_tokens(text: str) -> list[str]:
    """The default token counter: words and single punctuation marks."""
    return _WORD_TOKEN.findall(text)


def chunk_documents(docs: Sequence[Document], chunk_size: int = 256, overlap: int = 32,
                    count_tokens: Callable[[str], list] | None = None) -> list[Chunk]:
    """Chunks of at most `chunk_size` tokens overlapping by up to `overlap`, broken at word boundaries (preferably a
    sentence end in the window's second half; a word longer than `chunk_size` is its own chunk). chunk_id =
    f"{doc_id}#{i}"; meta = doc meta plus source, chunk_index, char_start, char_end and n_tokens.

    Args:
        count_tokens: an encode function `str -> list` (e.g. the LM tokenizer's); default `word_tokens`. Each word is
            counted with the whitespace before it, exact for tokenizers that pre-split at whitespace (BPE, WordPiece).
    """
    if chunk_size < 1 or not 0 <= overlap < chunk_size:
        raise UserError(f"chunking needs chunk_size >= 1 and 0 <= overlap < chunk_size (got {chunk_size}, {overlap})")
    encode = count_tokens or word_tokens
    chunks = []
    for doc in docs:
        text = doc.text
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        if not spans:
            continue
        whole = len(encode(text[spans[0][0]:spans[-1][1]]))
        if whole <= chunk_size:  # the common case for definitions: one chunk, one encode call
            pieces = [(spans[0][0], spans[-1][1], whole)]
        else:
            pieces = _pack(text, spans, encode, chunk_size, overlap)
        for i, (s, e, n) in enumerate(pieces):
            meta = {**doc.meta, "source": doc.source, "chunk_index": i, "char_start": s, "char_end": e, "n_tokens": n}
            chunks.append(Chunk(f"{doc.doc_id}#{i}", doc.doc_id, text[s:e], doc.title, meta))
    return chunks


def _pack(text: str, spans: list[tuple[int, int]], encode: Callable[[str], list], chunk_size: int,
          overlap: int) -> list[tuple[int, int, int]]:
    """Greedy windows over words: (char_start, char_end, n_tokens) per chunk."""
    n = len(spans)
    counts = [len(encode(text[spans[i - 1][1] if i else spans[0][0]:spans[i][1]])) for i in range(n)]
    ends_sentence = [bool(_SENTENCE_END.search(text[s:e])) for s, e in spans]
    cum = [0, *itertools.accumulate(counts)]  # cum[j] = tokens in words [0, j)
    out, start = [], 0
    while start < n:
        end = max(bisect.bisect_right(cum, cum[start] + chunk_size) - 1, start + 1)  # words [start, end)
        if end < n:
            for j in range(end, start, -1):  # prefer a sentence end in the window's second half
                if cum[j] - cum[start] < chunk_size // 2:
                    break
                if ends_sentence[j - 1]:
                    end = j
                    break
        out.append((spans[start][0], spans[end - 1][1], cum[end] - cum[start]))
        if end >= n:
            break
        nxt = end
        while nxt - 1 > start and cum[end] - cum[nxt - 1] <= overlap:
            nxt -= 1
        start = nxt
    return out


def corpus_fingerprint(chunks: Sequence[Chunk]) -> str:
    """sha256 over chunk ids and texts: the cache key of every index built from these chunks."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.chunk_id.encode() + b"\x00" + c.text.encode() + b"\x01")
    return h.hexdigest()


def load_corpus(source: str | Path = "ontology", chunk_size: int = 256, overlap: int = 32,
                encode: Callable[[str], list] | None = None) -> tuple[list[Document], list[Chunk]]:
    """`load_documents` then `chunk_documents`: the (docs, chunks) pair every pipeline stage starts from."""
    docs = load_documents(source)
    return docs, chunk_documents(docs, chunk_size, overlap, encode)
