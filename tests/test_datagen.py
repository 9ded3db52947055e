"""Datagen on the embedded default: well-formed, grounded, deterministic pairs; the Knowledge Graph section names only
graph content; resume after SIGKILL and torn lines; model-rejected answers via the sampler; the HTTP teacher
against our own server with a restart mid-run."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from preflexor.data import read_pairs, tokenize_pair, validate_record
from preflexor.datagen import example_seed, generate_pairs, model_prompt, read_existing
from preflexor.errors import UserError
from preflexor.graph import KnowledgeGraph, parse_triples
from preflexor.teacher import KNOWLEDGE_GRAPH, SECTIONS, GroundedTeacher, HTTPTeacher, clean_definition
from preflexor.thinking import TRIGGER, split_thinking

ROOT = Path(__file__).resolve().parent.parent
SECTION_RE = re.compile(r"^\*\*(.+?)\*\*:$", re.M)


@pytest.fixture(scope="module")
def sources():
    from preflexor.corpus import load_corpus
    from preflexor.graph import KnowledgeGraph
    from preflexor.retriever import build_retriever

    docs, chunks = load_corpus("ontology")
    return docs, chunks, KnowledgeGraph.from_corpus(docs, chunks), build_retriever("tfidf", chunks)


def split_chosen(chosen: str) -> tuple[str, dict[str, str], str]:
    """(thinking text, {section: content}, answer) of a chosen response; asserts the block is well-formed."""
    assert chosen.startswith("<|thinking|>\n")
    assert chosen.count("<|thinking|>") == 1 and chosen.count("<|/thinking|>") == 1
    thinking, answer = chosen[len("<|thinking|>\n"):].split("<|/thinking|>")
    names = SECTION_RE.findall(thinking)
    parts = SECTION_RE.split(thinking)[1:]
    return thinking, {n: c.strip() for n, c in zip(parts[::2], parts[1::2])} if len(parts) % 2 == 0 else {}, \
        answer.strip()


def test_grounded_pairs_wellformed_grounded_and_deterministic(sources, tmp_path):
    docs, chunks, graph, retriever = sources
    teacher = GroundedTeacher(docs, chunks, graph, retriever, seed=0)
    n = 32
    t0 = time.perf_counter()
    recs = generate_pairs(n, teacher, docs, chunks, graph, retriever, "teacher_incorrect",
                          out_path=tmp_path / "a.jsonl", seed=0, progress=False)
    dt = time.perf_counter() - t0
    print(f"grounded teacher: {n} pairs in {dt:.2f}s = {n / dt:.1f} pairs/s")
    assert len(recs) == n and [r["meta"]["index"] for r in recs] == list(range(n))
    assert read_pairs(tmp_path / "a.jsonl")[0] == recs  # the file holds exactly what was returned
    by_id = {c.chunk_id: c for c in chunks}
    terms = {d.doc_id: d for d in docs}
    for r in recs:
        assert validate_record(r) is None
        m = r["meta"]
        assert r["prompt"] == m["question"] + TRIGGER and "<|thinking|>" not in m["question"]
        thinking, sections, answer = split_chosen(r["chosen"])
        assert list(sections) == SECTIONS and all(sections.values())  # all 7 sections, in order, non-empty
        assert answer == m["answer"] and len(answer.split()) >= 10
        # grounded: the answer states the focus term's own definition, and every concept label it names as a parent
        # is a true ontology parent; the terms it uses occur in the chunks the example was built from
        focus = terms[m["focus"]]
        assert focus.meta["label"].lower() in m["question"].lower()
        definition = clean_definition(focus.text.split(": ", 1)[1])
        assert definition in answer
        source_text = " ".join(by_id[c].text for c in m["context_chunks"] + m["retrieved_chunks"] + m["graph_chunks"])
        assert focus.meta["label"] in source_text and definition.split(".")[0] in clean_definition(source_text)
        parents = {terms[p].meta["label"] for p, d in focus.meta["ancestors"].items() if d == 1 and p in terms}
        named = [lab for lab in parents if lab in answer]
        assert named, (answer, parents)
        for lab in named:
            assert lab in source_text, lab
        assert f"{focus.doc_id}#0" in m["context_chunks"]  # the question was drawn from the term's own chunk
        assert set(m["retrieved_chunks"]).isdisjoint(m["context_chunks"]) and len(m["retrieved_chunks"]) == 3
        # the Knowledge Graph section lists only edges of the graph, with their relation
        triples = parse_triples(sections["Knowledge Graph"])
        assert 1 <= len(triples) <= 8 and [list(t) for t in triples] == m["triples"]
        for a, rel, b in triples:
            assert graph.has_edge(a, rel, b), (a, rel, b)
        # the incorrect answer talks about the same term with another term's definition
        assert r["rejected"] != answer and definition not in r["rejected"]
        assert focus.meta["label"].lower() in r["rejected"].lower()
    assert len({r["prompt"] for r in recs}) >= n - 2  # questions vary
    # deterministic for a seed: same records again (also with the graph and teacher rebuilt), others for another seed
    again = generate_pairs(n, GroundedTeacher(docs, chunks, graph, retriever, seed=0), docs, chunks, graph, retriever,
                           "teacher_incorrect", seed=0, progress=False)
    assert again == recs
    other = generate_pairs(4, GroundedTeacher(docs, chunks, graph, retriever, seed=1), docs, chunks, graph, retriever,
                           "teacher_incorrect", seed=1, progress=False)
    assert [r["chosen"] for r in other] != [r["chosen"] for r in recs[:4]]
    # a later iteration of the active loop continues the index sequence with new examples
    later = generate_pairs(4, teacher, docs, chunks, graph, retriever, "teacher_incorrect", seed=0, start_index=n,
                           progress=False)
    assert [r["meta"]["index"] for r in later] == list(range(n, n + 4))


def test_topics_and_no_retrieval(sources):
    docs, chunks, graph, retriever = sources
    teacher = GroundedTeacher(docs, chunks, graph, retriever, seed=0)
    recs = generate_pairs(2, teacher, docs, chunks, graph, retriever, "teacher_incorrect", topics=["enamel", "silk"],
                          progress=False)
    assert [r["meta"]["topic"] for r in recs] == ["enamel", "silk"]
    by_id = {c.chunk_id: c for c in chunks}
    for r in recs:  # the contexts were retrieved for the topic
        assert all(r["meta"]["topic"] in by_id[c].text.lower() for c in r["meta"]["context_chunks"][:1])
    recs = generate_pairs(2, teacher, docs, chunks, graph, None, "teacher_incorrect", progress=False)
    # no retriever = the reference's use_rag=False: nothing is added to the drawn chunks, not even the graph's
    assert all(r["meta"]["retrieved_chunks"] == [] == r["meta"]["graph_chunks"] for r in recs)
    assert all(f"**{KNOWLEDGE_GRAPH}**" in r["chosen"] for r in recs)
    # kg_triples 0: the paper's six sections, no Knowledge Graph section
    six = generate_pairs(2, teacher, docs, chunks, graph, retriever, "teacher_incorrect", kg_triples=0, progress=False)
    for r in six:
        heads = re.findall(r"^\*\*(.+?)\*\*:", split_thinking(r["chosen"])["thinking"], re.M)
        assert heads == SECTIONS[1:], heads
    with pytest.raises(UserError, match="rejected source 'nope'"):
        generate_pairs(1, teacher, docs, chunks, graph, None, "nope", progress=False)
    with pytest.raises(UserError, match="needs a model"):
        generate_pairs(1, teacher, docs, chunks, graph, None, "model", progress=False)


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "preflexor.datagen", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_resume_after_sigkill_and_torn_line(sources, tmp_path):
    out = tmp_path / "pairs.jsonl"
    n = 150
    args = ["--out", str(out), "--n", str(n), "--no-progress", "retrieval=none", "batch_size=1"]
    p = _cli(args)
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        lines = out.read_bytes().count(b"\n") if out.exists() else 0
        if lines >= 10:
            p.send_signal(signal.SIGKILL)
            killed_at = lines
            break
        time.sleep(0.01)
    p.wait()
    assert killed_at is not None and killed_at < n, p.stderr.read()
    with open(out, "ab") as f:  # a line torn by the kill (what an interrupted append could leave)
        f.write(b'{"prompt": "half a rec')
    kept = len(read_existing(out))  # repairs the torn line
    assert kept >= killed_at and out.read_bytes().endswith(b"\n")
    with open(out, "ab") as f:
        f.write(b'{"prompt": "torn again')
    p = _cli(args)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["pairs"] == n and summary["new"] == n - kept
    # the graph it used is saved next to the pairs, one growth line per run, PNGs of asked-about concepts
    gdir = tmp_path / "pairs_graph"
    growth = [json.loads(x) for x in (gdir / "growth.jsonl").read_text().splitlines()]
    assert [g["step"] for g in growth] == [f"{n} pairs"] and len(growth[0]["pngs"]) == 3
    saved = KnowledgeGraph.from_json(gdir / "graph.json")
    assert saved.g.number_of_edges() == sources[2].g.number_of_edges() == growth[0]["edges"]
    records, problems = read_pairs(out)
    assert not problems and len(records) == n
    assert [r["meta"]["index"] for r in records] == list(range(n))  # exactly N unique examples, in order
    assert len({r["meta"]["index"] for r in records}) == n
    # identical to an uninterrupted run with the same config (in process, same sources)
    docs, chunks, graph, _ = sources
    teacher = GroundedTeacher(docs, chunks, graph, None, seed=0)
    cli_settings = {"corpus": "ontology", "chunking": [256, 32], "model": None}
    fresh = generate_pairs(n, teacher, docs, chunks, graph, None, "teacher_incorrect", seed=0, progress=False,
                           run_settings=cli_settings)
    assert fresh == records
    # resuming a complete file writes nothing; a different config refuses to mix into it, naming file:line
    size = out.stat().st_size
    assert generate_pairs(n, teacher, docs, chunks, graph, None, "teacher_incorrect", out_path=out, seed=0,
                          progress=False, run_settings=cli_settings) == records
    assert out.stat().st_size == size
    with pytest.raises(UserError, match=rf"{re.escape(str(out))}:1: written by a different datagen configuration"):
        generate_pairs(n, teacher, docs, chunks, graph, None, "teacher_incorrect", out_path=out, seed=1,
                       progress=False, run_settings=cli_settings)
    # a bad line in the middle is an error, not silently dropped
    lines = out.read_text().splitlines(keepends=True)
    lines[5] = "garbage\n"
    out.write_text("".join(lines))
    with pytest.raises(UserError, match=rf"{re.escape(str(out))}:6: invalid JSON"):
        read_existing(out)


def test_rejected_from_model_via_sampler(sources, tiny_llama_dir):
    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.sampler import generate

    docs, chunks, graph, retriever = sources
    model, tok = load_model_and_tokenizer(tiny_llama_dir)
    teacher = GroundedTeacher(docs, chunks, graph, retriever, seed=0)
    for stage in (1, 2):
        recs = generate_pairs(3, teacher, docs, chunks, graph, retriever, "model", model, tok, seed=5, stage=stage,
                              max_new_tokens=6, progress=False)
        assert all(validate_record(r) is None and r["meta"]["rejected_source"] == "model" for r in recs)
        # the rejected text is the sampler's output for the example's seed on the stage's prompt
        r = recs[1]
        ids = model_prompt(tok, r["meta"]["question"], stage)
        want = generate(model, [ids], max_new_tokens=6, temperature=1.0, top_k=50, top_p=0.9,
                        stop_ids=tok.stop_ids, seed=example_seed(5, 1), pad_id=tok.pad_id)[0][0]
        assert r["rejected"] == tok.decode(want, skip_special=True).strip()
        text = tok.decode(ids)
        if stage == 1:  # stage 1 asks for a direct answer, without the thinking trigger
            assert "<|thinking|>" not in text and r["meta"]["question"] in text
        else:  # stage 2 samples on-policy from exactly the training prompt
            assert ids == tokenize_pair(tok, r)["prompt_ids"]


def test_llm_teacher_triples_grow_the_graph(sources):
    """With an LLM teacher (a fake OpenAI server here) the Knowledge Graph section lists the teacher's triples,
    which are added to the graph with provenance, so the section still names only graph content."""
    from test_teacher import FakeOpenAI

    from preflexor.graph import KnowledgeGraph

    docs, chunks, _, retriever = sources
    graph = KnowledgeGraph.from_corpus(docs, chunks)
    kg_reply = "[bone tissue] -[IS-A]-> [skeletal tissue]\n[bone tissue] -[INFLUENCES]-> [stiffness of bones]\n"

    def reply(body):
        user = body["messages"][-1]["content"]
        return kg_reply if "[Concept A] -[RELATION]-> [Concept B]" in user else "Why is bone tissue stiff?"

    srv = FakeOpenAI(reply=reply)
    try:
        teacher = HTTPTeacher(srv.url, max_concurrency=4)
        edges = graph.g.number_of_edges()
        recs = generate_pairs(2, teacher, docs, chunks, graph, retriever, "teacher_incorrect", seed=0, progress=False)
    finally:
        srv.close()
    for r in recs:
        _, sections, answer = split_chosen(r["chosen"])
        assert list(sections) == SECTIONS and answer == "Why is bone tissue stiff?"
        assert parse_triples(sections["Knowledge Graph"]) == [("bone tissue", "is_a", "skeletal tissue"),
                                                             ("bone tissue", "influences", "stiffness of bones")]
        assert r["meta"]["teacher"] == "http" and r["meta"]["concepts"][:1] == ["bone tissue"]
    assert graph.has_edge("bone tissue", "influences", "stiffness of bones")
    assert graph.g.number_of_edges() == edges + 1  # is_a already existed (merged); one new edge
    new_node = graph.resolve("stiffness of bones")
    provenance = graph.g.nodes[new_node]["chunk_ids"]
    assert provenance and set(provenance) <= {c for r in recs for c in r["meta"]["context_chunks"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "preflexor.server", "--model", "smollm2-135m-instruct",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("server did not start")


@pytest.mark.slow
def test_http_teacher_against_our_server_with_restart(sources, tmp_path):
    docs, chunks, graph, retriever = sources
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = _start_server(port)
    try:
        _wait_ready(base, server)
        # 2 examples run concurrently, so the 3rd starts only after 2 lines are written: the kill below hits it
        teacher = HTTPTeacher(base + "/v1", model="smollm2", max_tokens=8, backoff=1.0, max_retries=8,
                              max_concurrency=2)
        out = tmp_path / "http.jsonl"
        n = 3
        edges_before = graph.g.number_of_edges()
        result = {}

        def run():
            try:
                result["recs"] = generate_pairs(n, teacher, docs, chunks, graph, None, "teacher_incorrect",
                                                out_path=out, seed=0, context_chunks=1, batch_size=1, progress=False)
            except BaseException as e:  # surfaced by the assertion below
                result["error"] = e

        t0 = time.perf_counter()
        th = threading.Thread(target=run)
        th.start()
        while th.is_alive() and not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)  # the server dies mid-run ...
        server.wait()
        time.sleep(1.0)
        server = _start_server(port)  # ... and comes back on the same port
        th.join(timeout=600)
        print(f"http teacher: {n} pairs in {time.perf_counter() - t0:.1f}s, {teacher.retries} retried requests")
        assert "error" not in result, result.get("error")
        assert teacher.retries >= 1
        records, problems = read_pairs(out)
        assert not problems and [r["meta"]["index"] for r in records] == list(range(n))
        assert records == result["recs"]
        for r in records:
            _, sections, answer = split_chosen(r["chosen"])
            assert list(sections) == SECTIONS and answer and r["meta"]["teacher"] == "http"
            for a, rel, b in parse_triples(sections["Knowledge Graph"]):
                assert graph.has_edge(a, rel, b)
        assert graph.g.number_of_edges() >= edges_before
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from preflexor.datagen import main

    for argv, needle in [(["--n", "2", "nokey=1"], "unknown config key 'nokey'"),
                         (["--n", "0"], "--n must be >= 1"),
                         (["--n", "2", "--config", str(tmp_path / "missing.yaml")], "config file not found")]:
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "x.jsonl"), *argv])
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
