"""Preference pairs "in situ" from a corpus, with the reference's structure (preflexor.md §2.2):

    random chunks (or a topic -> retrieval) -> question -> retrieval over the whole corpus enriches the context, and
    the knowledge graph adds the neighbourhood of the question's concepts -> thinking sections -> answer
    chosen   = <|thinking|> sections <|/thinking|> answer
    rejected = the current model's own answer (stage 1: prompt without the thinking trigger; stage 2: with it,
               sampled on-policy), or the teacher's incorrect answer
    prompt   = question + " Use <|thinking|>."

Records are JSONL `{"prompt", "chosen", "rejected", "meta"}` with provenance in meta, appended line by line with
fsync; a rerun keeps the valid lines (a torn last line is cut away) and continues from their count. Every example is
seeded from (seed, index), so a rerun writes the same examples and no index twice. `PairSource` is the training
scripts' view: a fixed JSONL, or the active loop's fresh pairs every iteration. The knowledge graph is an output too
(`save_graph`): next to the pairs (`<out stem>_graph/`) and in a run's `data/graph/` after every iteration.

CLI: python -m preflexor.datagen --out data/pairs.jsonl --n 64 [--config configs/data.yaml] [key=value ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch.distributed as dist

from preflexor.config import above, at_least, within
from preflexor.data import load_pairs, validate_record
from preflexor.errors import UserError, exit_on_user_error
from preflexor.fast import cpu_infer
from preflexor.graph import format_triples
from preflexor.tasks import HELDOUT_START, answer_set, check
from preflexor.teacher import BACKGROUND, CATEGORIES, KNOWLEDGE_GRAPH, ChatTeacher, format_context, stable_rng
from preflexor.thinking import TRIGGER, assemble_thinking, final_answer
from preflexor.utils import append_jsonl, atomic_write_text, json_line

# stage-1 rejected prompt: the question without the thinking trigger, asking for a direct answer (§2.2 step 8)
DIRECT_ANSWER_PROMPT = "Give the answer to this question: {question}\nThe answer is:"
REJECTED_SOURCES = ("model", "teacher_incorrect")


@dataclass
class DatagenConfig:
    """configs/data.yaml; every key can be overridden on the command line as key=value."""
    RANGES: ClassVar[dict] = {
        "chunk_size": at_least(1), "chunk_overlap": at_least(0), "retrieve_k": at_least(0),
        "context_chunks": at_least(1), "kg_triples": at_least(0), "section_lines": at_least(1),
        "teacher_max_tokens": at_least(1), "max_concurrency": at_least(1), "timeout": above(0),
        "max_retries": at_least(0), "backoff": at_least(0), "stage": within(1, 2), "temperature": at_least(0),
        "top_k": at_least(1), "top_p": within(0, 1, open_lo=True), "max_new_tokens": at_least(1),
        "batch_size": at_least(1)}
    corpus: str = "ontology"  # "ontology", a folder of .txt/.md, or a .jsonl with "text"
    chunk_size: int = 256
    chunk_overlap: int = 32
    retrieval: str = "tfidf"  # tfidf | dense | hybrid | graph (reasoning teacher: facts from the graph) | none
    retrieve_k: int = 3  # chunks retrieved for the question (enrichment)
    context_chunks: int = 3  # random chunks the question is drawn from (the reference takes 3)
    topics: list[str] | None = None  # instead of random chunks: retrieve the context for each topic in turn
    kg_triples: int = 8  # at most this many graph triples in the Knowledge Graph section; 0 = no such section
    section_lines: int | None = None  # grounded teacher: at most this many lines per thinking section
    teacher: str = "grounded"  # grounded | http | local
    teacher_url: str = "http://127.0.0.1:8000/v1"
    teacher_model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    teacher_source: str | None = None  # checkpoint of the local teacher
    teacher_max_tokens: int = 512
    max_concurrency: int = 4  # HTTP teacher: requests in flight
    timeout: float = 120.0
    max_retries: int = 5
    backoff: float = 0.5
    rejected: str = "teacher_incorrect"  # model | teacher_incorrect
    stage: int = 1  # the model's rejected answer: 1 = without the thinking trigger, 2 = with it
    model: str = "smollm2-135m-instruct"  # policy that writes model-rejected answers
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = 0.9
    max_new_tokens: int = 256
    batch_size: int = 16  # examples per batch (one sampler call for model-rejected answers)
    system_prompt: str | None = None
    seed: int = 0


# -- one example, teacher side -----------------------------------------------------------------------------------------

def _context(i: int, seed: int, chunks, retriever, topics, n_context: int):
    if topics:
        topic = topics[i % len(topics)]
        if retriever is None:
            raise UserError("datagen: topics need a retriever (retrieval must not be 'none')")
        return topic, [c for c, _ in retriever.search(topic, n_context)]
    return None, stable_rng(seed, "context", i).sample(list(chunks), min(n_context, len(chunks)))


def teacher_part(i: int, teacher, chunks, graph, retriever, seed: int, topics=None, context_chunks: int = 3,
                 retrieve_k: int = 3, kg_triples: int = 8, want_incorrect: bool = False,
                 graph_lock: threading.Lock | None = None, chunk_index: dict | None = None) -> dict:
    """Everything of example i that the teacher writes: prompt, chosen, (incorrect answer) and provenance."""
    if hasattr(teacher, "example"):  # a teacher of whole examples (tasks.ReasoningTeacher): facts in the prompt
        out = teacher.example(i)
        out["meta"]["question"] = out["prompt"]  # what the model is asked (facts + question), without the trigger
        out["prompt"] += TRIGGER
        if not want_incorrect:
            del out["rejected"]
        return out
    lock = graph_lock or threading.Lock()
    by_id = chunk_index if chunk_index is not None else {c.chunk_id: c for c in chunks}
    topic, ctx = _context(i, seed, chunks, retriever, topics, context_chunks)
    question = " ".join(teacher.question_for(ctx).split())
    if not question:
        raise UserError(f"datagen: teacher {teacher.name} returned an empty question for example {i}")
    # retrieval over the whole corpus enriches the context (the reference's RAG step)
    ctx_ids = {c.chunk_id for c in ctx}
    retrieved = [] if retriever is None else \
        [c for c, _ in retriever.search(question, retrieve_k + len(ctx)) if c.chunk_id not in ctx_ids][:retrieve_k]
    # the knowledge graph adds the neighbourhood of the question's concepts (its chunks only with retrieval on: no
    # retriever = the reference's use_rag=False, the context is the drawn chunks alone)
    with lock:
        concepts, triples, graph_chunk_ids = graph_context(graph, question, kg_triples)
    graph_chunks = [] if retriever is None else \
        [by_id[cid] for cid in graph_chunk_ids if cid in by_id and cid not in ctx_ids
         and cid not in {c.chunk_id for c in retrieved}]
    context = format_context(ctx)
    if retrieved or graph_chunks:
        context += "\n\nAdditional information:\n" + format_context(retrieved + graph_chunks)
    sections = teacher.thinking_sections(question, context, concepts)
    kg = list(teacher.knowledge_graph(question, context, triples))
    if isinstance(teacher, ChatTeacher):  # an LLM's triples grow the graph (Graph-PRefLexOR); list what was added
        with lock:
            added = graph.add_triples(format_triples(kg), [c.chunk_id for c in ctx], f"teacher:{teacher.name}")
            kg = [(graph.label(u), r, graph.label(v)) for u, r, v in added]
    kg = list(dict.fromkeys(kg))[:kg_triples] or triples
    # kg_triples 0: no Knowledge Graph section, the reference's six sections (PRefLexOR before Graph-PRefLexOR)
    ordered = {KNOWLEDGE_GRAPH: format_triples(kg) if kg else "(no known relations)"} if kg_triples > 0 else {}
    ordered.update({name: sections.get(name, "") for name in [*CATEGORIES, BACKGROUND]})
    thinking = assemble_thinking(ordered)
    answer = teacher.answer(question, context, thinking).strip()
    if not answer:
        raise UserError(f"datagen: teacher {teacher.name} returned an empty answer for example {i}")
    out = {"prompt": question + TRIGGER, "chosen": thinking + "\n" + answer,
           "meta": {"index": i, "seed": seed, "question": question, "answer": answer, "topic": topic,
                    "teacher": teacher.name, "context_chunks": [c.chunk_id for c in ctx],
                    "retrieved_chunks": [c.chunk_id for c in retrieved],
                    "graph_chunks": [c.chunk_id for c in graph_chunks], "concepts": list(concepts),
                    "triples": [list(t) for t in kg]}}
    if hasattr(teacher, "focus_of"):  # the grounded teacher: which ontology term the question is about
        out["meta"]["focus"] = teacher.focus_of(question)
    if want_incorrect:
        out["rejected"] = teacher.incorrect_answer(question).strip() or "I do not know."
    return out


def graph_context(graph, question: str, max_triples: int) -> tuple[list[str], list[tuple[str, str, str]], list[str]]:
    """(labels of the concepts in the question, up to `max_triples` (A, relation, B) label triples of their
    neighbourhood, chunk ids defining those concepts and their neighbours)."""
    nodes = graph.find_concepts(question)
    per = max(1, max_triples // max(1, len(nodes)))  # share the budget between the question's concepts
    edges: dict[tuple[str, str, str], None] = {}
    for rnd in (per, max_triples):
        for n in nodes:
            for e in graph.neighbourhood_edges(n, hops=1, max_edges=rnd):
                if len(edges) < max_triples:
                    edges.setdefault(e)
    chunk_ids: dict[str, None] = {}
    for n in [*nodes, *(x for u, _, v in edges for x in (u, v))]:
        # the chunks defining a concept (an ontology term's own document), else the first chunk mentioning it
        cids = graph.g.nodes[n].get("chunk_ids", [])
        chunk_ids.update(dict.fromkeys([c for c in cids if c.startswith(n + "#")] or cids[:1]))
    triples = [(graph.label(u), r, graph.label(v)) for u, r, v in edges]
    return [graph.label(n) for n in nodes], triples, list(chunk_ids)


# -- rejected answers from the model (batched sampler) -----------------------------------------------------------------

def model_prompt(tok, question: str, stage: int, system: str | None = None) -> list[int]:
    """Token ids of the rejected-answer prompt: stage 1 asks for a direct answer (no thinking trigger), stage 2 uses
    the training prompt itself (question + trigger), formatted exactly as `data.tokenize_pair` formats it."""
    text = DIRECT_ANSWER_PROMPT.format(question=question) if stage == 1 else question + TRIGGER
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok.encode_chat(msgs, add_generation_prompt=True, allow_special=True)


def model_rejected(model, tok, questions: Sequence[str], seeds: Sequence[int], stage: int = 1,
                   max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = 50,
                   top_p: float | None = 0.9, system: str | None = None) -> list[str]:
    """The policy's own answers, one sampler call for the batch (T=1.0, top-k 50, top-p 0.9 as in §4.3), one seed per
    question. An empty sample is redrawn once with another seed; if still empty the answer is "I do not know."."""
    from preflexor.sampler import generate

    prompts = [model_prompt(tok, q, stage, system) for q in questions]
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=1,
              stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    outs = [tok.decode(o[0], skip_special=True).strip() for o in generate(model, prompts, seed=list(seeds), **kw)]
    empty = [j for j, o in enumerate(outs) if not o]
    if empty:
        again = generate(model, [prompts[j] for j in empty], seed=[seeds[j] + 7919 for j in empty], **kw)
        for j, o in zip(empty, again):
            outs[j] = tok.decode(o[0], skip_special=True).strip() or "I do not know."
    return outs


# -- resumable output --------------------------------------------------------------------------------------------------

def read_existing(path: str | Path, run_id: str | None = None, stride: int = 1, repair: bool = True) -> list[dict]:
    """Valid records already in `path`, in order (example indices `stride` apart). Any bad line, an index out of
    sequence, or a record from another configuration is a UserError. A torn last line (no newline, or not JSON) is
    cut away, and a complete last record lacking its newline gets one, but only once the file is known to be ours:
    at least one complete datagen record before it (of run `run_id` when given). A file this program did not write
    is refused, never rewritten."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records, pos, lineno, tail = [], 0, 0, None
    while pos < len(data):
        nl = data.find(b"\n", pos)
        line = data[pos:] if nl < 0 else data[pos:nl]
        lineno += 1
        is_last = nl < 0 or nl == len(data) - 1
        blank = not line.strip()
        try:
            obj = None if blank else json_line(line)
            reason = None if blank else validate_record(obj)
        except ValueError as e:
            obj, reason = None, str(e)
        if nl < 0 and not blank and reason is None:
            tail = ("newline", lineno)  # a complete record that only lacks its newline
        elif not blank and is_last and (nl < 0 or reason is not None):
            tail = ("torn", lineno, pos, reason or "no newline")  # an interrupted append
            break
        if not blank:
            if reason is not None:
                raise UserError(f"{path}:{lineno}: {reason}")
            meta = obj.get("meta") or {}
            expected = records[0]["meta"]["index"] + stride * len(records) if records else meta.get("index")
            if not isinstance(meta.get("index"), int) or meta["index"] != expected or not meta.get("run"):
                raise UserError(f"{path}:{lineno}: example index {meta.get('index')!r} out of sequence "
                                f"(expected {expected}) or no run id; not a datagen output file?")
            if run_id is not None and meta["run"] != run_id:
                raise UserError(f"{path}:{lineno}: written by a different datagen configuration (run "
                                f"{meta['run']}, now {run_id}); use another --out or delete the file")
            records.append(obj)
        pos = len(data) if nl < 0 else nl + 1
    if tail is not None and tail[0] == "torn" and not records:
        raise UserError(f"{path}:{tail[1]}: {tail[3]}; not a datagen output file? (refusing to change it: use "
                        f"another --out or delete the file)")
    if tail is not None and repair:
        with open(path, "r+b") as f:
            if tail[0] == "newline":
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(tail[2])
                print(f"datagen: removed a torn last line from {path} (line {tail[1]})", file=sys.stderr)
            f.flush()
            os.fsync(f.fileno())
    return records


# -- the pipeline ------------------------------------------------------------------------------------------------------

def generate_pairs(n: int, teacher, docs, chunks, graph, retriever=None, rejected_source: str = "model",
                   model=None, tokenizer=None, out_path: str | Path | None = None, seed: int = 0,
                   start_index: int = 0, stage: int = 1, topics: Sequence[str] | None = None,
                   context_chunks: int = 3, retrieve_k: int = 3, kg_triples: int = 8, max_new_tokens: int = 256,
                   temperature: float = 1.0, top_k: int | None = 50, top_p: float | None = 0.9,
                   system_prompt: str | None = None, batch_size: int = 16, progress: bool = True,
                   run_settings: dict | None = None, stride: int = 1) -> list[dict]:
    """The n preference pairs `start_index .. start_index + n - 1`, in index order (the training loop's iteration k
    passes start_index = k * n so every iteration sees new contexts). With `out_path` each record is appended (fsync)
    as soon as its batch is done, and an existing file is resumed: its valid records are kept and returned,
    generation continues after them. Teachers with `concurrency > 1` (HTTP) are called concurrently; model-rejected
    answers are sampled in one batch per `batch_size`."""
    from tqdm import tqdm

    if rejected_source not in REJECTED_SOURCES:
        raise UserError(f"datagen: rejected source {rejected_source!r} (choose from {', '.join(REJECTED_SOURCES)})")
    if rejected_source == "model" and (model is None or tokenizer is None):
        raise UserError("datagen: rejected source 'model' needs a model and its tokenizer")
    if stage not in (1, 2):
        raise UserError(f"datagen: stage must be 1 or 2, got {stage}")
    settings = {"teacher": teacher_id(teacher), "rejected": rejected_source, "stage": stage, "seed": seed,
                "topics": list(topics or []), "context_chunks": context_chunks, "retrieve_k": retrieve_k,
                "kg_triples": kg_triples, "n_chunks": len(chunks), "retriever": type(retriever).__name__,
                **({"sampling": [max_new_tokens, temperature, top_k, top_p, system_prompt]}
                   if rejected_source == "model" else {}), **(run_settings or {})}
    # short hash of everything that determines the examples (not n, not the output path)
    run_id = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    records = read_existing(out_path, run_id, stride) if out_path is not None else []
    if records and records[0]["meta"]["index"] != start_index:
        raise UserError(f"{out_path}:1: starts at example {records[0]['meta']['index']}, expected {start_index}")
    records = records[:n]
    todo = [start_index + stride * k for k in range(len(records), n)]
    workers = max(1, int(getattr(teacher, "concurrency", 1)))
    graph_lock = threading.Lock()
    chunk_index = {c.chunk_id: c for c in chunks}
    bar = tqdm(total=n, initial=len(records), desc="pairs", unit="pair", disable=not progress, dynamic_ncols=True)

    def one(i: int) -> dict:
        return teacher_part(i, teacher, chunks, graph, retriever, seed, topics, context_chunks, retrieve_k,
                            kg_triples, rejected_source == "teacher_incorrect", graph_lock, chunk_index)

    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        step = max(batch_size, workers)
        for b in range(0, len(todo), step):
            idx = todo[b:b + step]
            parts = list(pool.map(one, idx)) if pool else [one(i) for i in idx]
            if rejected_source == "model":
                rej = model_rejected(model, tokenizer, [p["meta"]["question"] for p in parts],
                                     [example_seed(seed, i) for i in idx], stage, max_new_tokens, temperature,
                                     top_k, top_p, system_prompt)
                for p, r in zip(parts, rej):
                    p["rejected"] = r
                    if p["meta"].get("teacher") == "reasoning":  # a checkable answer: is the model right after all?
                        p["meta"]["rejected_correct"] = check(final_answer(r, keep_lines=True), p["meta"]["answer"])
            for p in parts:
                rec = {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                       "meta": {**p["meta"], "rejected_source": rejected_source, "stage": stage, "run": run_id}}
                if out_path is not None:
                    append_jsonl(out_path, rec)
                records.append(rec)
                bar.update(1)
    finally:
        bar.close()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return records


def example_seed(seed: int, index: int) -> int:
    """Sampler seed of example `index` (stable across runs and batch layouts)."""
    return stable_rng(seed, "rejected", index).randrange(2**31)


def teacher_id(teacher) -> str:
    """Which teacher wrote the data, for the run fingerprint and meta."""
    if hasattr(teacher, "url"):
        return f"http:{teacher.model}@{teacher.url}"
    if hasattr(teacher, "seed") and teacher.name == "grounded":
        lines = getattr(teacher, "section_lines", None)
        return f"grounded:{teacher.seed}" + (f":lines={lines}" if lines else "")
    if teacher.name == "reasoning":
        return f"reasoning:{teacher.seed}:kg={int(teacher.kg_section)}:facts={int(teacher.facts)}"
    return teacher.name


# -- CLI ---------------------------------------------------------------------------------------------------------------

def _opt(cfg, key: str):
    """cfg.key, or DatagenConfig's default when cfg (e.g. the training scripts' DataConfig) has no such key."""
    return getattr(cfg, key, getattr(DatagenConfig, key))


def build_sources(cfg, encode=None):
    """(docs, chunks, graph, retriever) for a DatagenConfig (or any config with corpus/retrieval keys)."""
    from preflexor.corpus import load_corpus
    from preflexor.graph import KnowledgeGraph
    from preflexor.retriever import build_retriever

    docs, chunks = load_corpus(_opt(cfg, "corpus"), _opt(cfg, "chunk_size"), _opt(cfg, "chunk_overlap"), encode)
    graph = KnowledgeGraph.from_corpus(docs, chunks)
    retriever = build_retriever(_opt(cfg, "retrieval"), chunks)
    return docs, chunks, graph, retriever


def reasoning_teacher(cfg, graph):
    """The reasoning teacher as a data config lays it out: the Knowledge Graph section when kg_triples > 0, the facts
    in the prompt unless retrieval is none (any other retrieval: the facts come from the graph)."""
    from preflexor.tasks import ReasoningTeacher

    return ReasoningTeacher(graph, seed=_opt(cfg, "seed"), kg_section=_opt(cfg, "kg_triples") > 0,
                            facts=_opt(cfg, "retrieval") != "none")


def build_teacher(cfg, docs, chunks, graph, retriever):
    """The teacher a config names: reasoning (KG tasks with checkable answers), grounded (definitions, no LLM), http
    (OpenAI-compatible server) or local (a checkpoint)."""
    from preflexor.teacher import GroundedTeacher, HTTPTeacher, LocalTeacher

    kind = _opt(cfg, "teacher")
    if kind == "reasoning":
        return reasoning_teacher(cfg, graph)
    if _opt(cfg, "retrieval") == "graph":
        raise UserError(f"datagen: retrieval 'graph' (facts from the knowledge graph) is the reasoning teacher's; "
                        f"teacher {kind!r} retrieves text: tfidf, dense, hybrid or none")
    if kind == "grounded":
        return GroundedTeacher(docs, chunks, graph, retriever, seed=_opt(cfg, "seed"),
                               section_lines=_opt(cfg, "section_lines"))
    if kind == "http":
        return HTTPTeacher(_opt(cfg, "teacher_url"), _opt(cfg, "teacher_model"), _opt(cfg, "api_key_env"),
                           _opt(cfg, "timeout"), _opt(cfg, "max_retries"), _opt(cfg, "backoff"),
                           _opt(cfg, "max_concurrency"), _opt(cfg, "teacher_max_tokens"))
    if kind == "local":
        from preflexor.checkpoint import load_model_and_tokenizer

        if not _opt(cfg, "teacher_source"):
            raise UserError("datagen: teacher 'local' needs teacher_source=<checkpoint>")
        m, t = load_model_and_tokenizer(_opt(cfg, "teacher_source"))
        return LocalTeacher(m, t, seed=_opt(cfg, "seed"), max_tokens=_opt(cfg, "teacher_max_tokens"))
    raise UserError(f"datagen: unknown teacher {kind!r} (choose from reasoning, grounded, http, local)")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from preflexor.config import load_config

    ap = argparse.ArgumentParser(description="Generate PRefLexOR preference pairs (JSONL, resumable).")
    ap.add_argument("--out", required=True, help="output JSONL (appended; an existing file is resumed)")
    ap.add_argument("--n", type=int, required=True, help="number of pairs the file should hold")
    ap.add_argument("--config", default=None, help="YAML config (see configs/data.yaml)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    args = ap.parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    cfg = load_config(DatagenConfig, args.config, args.overrides)
    t0 = time.perf_counter()
    docs, chunks, graph, retriever = build_sources(cfg)
    teacher = build_teacher(cfg, docs, chunks, graph, retriever)
    model = tok = None
    if cfg.rejected == "model":
        from preflexor.checkpoint import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(cfg.model)
    t_setup = time.perf_counter() - t0
    before = len(read_existing(args.out, repair=False))  # generate_pairs checks the run id, then repairs
    t1 = time.perf_counter()
    records = generate_pairs(args.n, teacher, docs, chunks, graph, retriever, cfg.rejected, model, tok, args.out,
                             cfg.seed, 0, cfg.stage, cfg.topics, cfg.context_chunks, cfg.retrieve_k, cfg.kg_triples,
                             cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.system_prompt,
                             cfg.batch_size, progress=not args.no_progress,
                             run_settings={"corpus": cfg.corpus, "chunking": [cfg.chunk_size, cfg.chunk_overlap],
                                           "model": cfg.model if cfg.rejected == "model" else None})
    dt = time.perf_counter() - t1
    out_path = Path(args.out)
    save_graph(graph, out_path.with_name(out_path.stem + "_graph"), records, step=f"{len(records)} pairs")
    new = len(records) - min(before, len(records))
    print(json.dumps({"out": str(args.out), "pairs": len(records), "new": new, "setup_s": round(t_setup, 2),
                      "gen_s": round(dt, 2), "pairs_per_s": round(new / dt, 2) if dt > 0 and new else None,
                      "config": asdict(cfg)}))


def save_graph(graph, out: Path, records: Sequence[dict] = (), n_png: int = 3, step: str = "") -> dict:
    """The knowledge graph a run built and used, into the folder `out`: graph.graphml and graph.json (replaced
    whole), a PNG of the 1-hop neighbourhood of the first `n_png` concepts asked about in `records`
    (meta.concepts), and one line per call in growth.jsonl (nodes, edges, chunks; `step` names the call, e.g. the
    active loop's iteration), so the graph's growth across iterations stays visible."""
    out.mkdir(parents=True, exist_ok=True)
    graph.to_graphml(out / "graph.graphml")
    graph.to_json(out / "graph.json")
    asked = list(dict.fromkeys(c for r in records for c in (r.get("meta") or {}).get("concepts", [])))
    pngs = []
    for c in [c for c in asked if graph.resolve(c) is not None][:n_png]:
        name = "".join(ch if ch.isalnum() else "_" for ch in graph.label(graph.resolve(c)).lower())[:60]
        graph.draw_neighbourhood_png(c, out / f"neighbourhood_{name}.png")
        pngs.append(f"neighbourhood_{name}.png")
    summary = {"step": step, **graph.summary(), "pngs": pngs}
    append_jsonl(out / "growth.jsonl", summary)
    return summary


class PairSource:
    """Where each iteration's pairs come from: a fixed preference JSONL (the last `data.heldout_pairs` records held
    out), or the active loop, which generates `data.pairs_per_iteration` fresh pairs per iteration with the current
    model writing the rejected answers (stage 1 without the thinking trigger, stage 2 with it); with
    `data.refresh: false` the same pairs are all generated before the first step, by the starting model (static.jsonl).
    Generated pairs are kept in `out_dir/data/` (iter_NNN.jsonl, heldout.jsonl); a resumed run reads them back
    instead of regenerating."""

    HELDOUT_INDEX = HELDOUT_START  # held-out examples live in their own index range, away from training contexts

    def __init__(self, cfg, tok, model, rt, out_dir: Path, stage: int):
        self.cfg, self.tok, self.model, self.rt, self.stage = cfg, tok, model, rt, stage
        self.dir = out_dir / "data"
        dc = cfg.data
        if dc.pairs:
            records = load_pairs(dc.pairs)
            n_held = min(dc.heldout_pairs, max(len(records) - 1, 0))
            self.train_records, self.heldout_records = records[:len(records) - n_held], records[len(records) - n_held:]
            self.sources = None
        else:
            gcfg = DatagenConfig(corpus=dc.corpus, retrieval=dc.retrieval, teacher=dc.teacher,
                                 teacher_url=dc.teacher_url, teacher_model=dc.teacher_model,
                                 teacher_source=dc.teacher_source, seed=dc.seed, system_prompt=dc.system_prompt,
                                 kg_triples=dc.kg_triples, section_lines=dc.section_lines)
            docs, chunks, graph, retriever = build_sources(gcfg)
            self.sources = (build_teacher(gcfg, docs, chunks, graph, retriever), docs, chunks, graph, retriever)
            self.heldout_records = None

    def _generate(self, n: int, start_index: int, path: Path) -> list[dict]:
        """Examples start_index .. start_index + n - 1 into `path`. Under torchrun every rank generates its share
        (examples rank, rank + world, ... into `path.rankR`, resumable); the shares are gathered in index order and
        rank 0 writes `path`. Every example is seeded by its index, so any world size writes the same file (with an
        LLM teacher that grows the graph, each rank's graph grows with its own examples only)."""
        rt, dc, sc = self.rt, self.cfg.data, self.cfg.sample
        if rt.world > 1 and path.is_file():  # merged before an interruption
            return load_pairs(path)
        teacher, docs, chunks, graph, retriever = self.sources
        shard = path if rt.world == 1 else path.with_name(f"{path.name}.rank{rt.rank}")
        was_training = self.model.training
        self.model.eval()
        records = generate_pairs(len(range(start_index + rt.rank, start_index + n, rt.world)), teacher, docs, chunks,
                                 graph, retriever, rejected_source=dc.rejected_source, model=self.model,
                                 tokenizer=self.tok, out_path=shard, seed=dc.seed, start_index=start_index + rt.rank,
                                 stride=rt.world, stage=self.stage, topics=dc.topics,
                                 context_chunks=dc.context_chunks, retrieve_k=dc.retrieve_k, kg_triples=dc.kg_triples,
                                 max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_k=sc.top_k,
                                 top_p=sc.top_p, system_prompt=dc.system_prompt, progress=rt.main)
        self.model.train(was_training)
        cpu_infer.release(self.model)  # training changes the weights next: the packed CPU copy would go stale
        if rt.world == 1:
            return records
        parts = [None] * rt.world
        dist.all_gather_object(parts, records)
        merged = [None] * n
        for r, part in enumerate(parts):
            merged[r::rt.world] = part
        if rt.main:
            atomic_write_text(path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in merged))
        dist.barrier()
        shard.unlink(missing_ok=True)
        return merged

    def graph(self):
        """The run's knowledge graph (the active loop's, or built from `data.corpus` for a pair file)."""
        if self.sources is not None:
            return self.sources[3]
        if getattr(self, "_graph", None) is None:
            self._graph = build_sources(DatagenConfig(corpus=self.cfg.data.corpus, retrieval="none"))[2]
            if self.rt.main:
                save_graph(self._graph, self.dir / "graph", step="corpus graph")
        return self._graph

    def answer_set(self, n: int) -> list[dict]:
        """The fixed evaluation set (`tasks.answer_set`: held-out concepts, the same for every run) over this run's
        corpus graph; [] when n is 0."""
        if n <= 0:
            return []
        try:
            return answer_set(self.graph(), n, kg_section=self.cfg.data.kg_triples > 0)
        except UserError as e:
            raise UserError(f"train.eval_answers: {e}") from None

    def heldout(self) -> list[dict]:
        if self.heldout_records is None:
            self.heldout_records = self._generate(self.cfg.data.heldout_pairs, self.HELDOUT_INDEX,
                                                  self.dir / "heldout.jsonl")
        return self.heldout_records

    def for_iteration(self, it: int) -> list[dict]:
        if self.sources is None:
            return self.train_records
        n = self.cfg.data.pairs_per_iteration
        if self.cfg.data.refresh:
            records = self._generate(n, it * n, self.dir / f"iter_{it:03d}.jsonl")
        else:  # static data: every iteration's pairs made at the start, by the starting model
            records = self._generate(n * self.cfg.train.iterations, 0, self.dir / "static.jsonl")[it * n:(it + 1) * n]
        if self.rt.main:  # the graph as this iteration left it (an LLM teacher grows it)
            save_graph(self.sources[3], self.dir / "graph", records, step=f"iteration {it}")
        if self.cfg.data.only_include_wrong_answers:  # the reference's switch: pairs whose rejected answer is right
            wrong = [r for r in records if not r["meta"].get("rejected_correct")]  # would teach against the gold
            if records and not wrong:
                raise UserError(f"iteration {it}: every sampled answer was right, so data.only_include_wrong_answers "
                                "left no pair (raise data.pairs_per_iteration)")
            records = wrong
        return records


if __name__ == "__main__":
    main()
