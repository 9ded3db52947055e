"""Teachers: the HTTP client (retries, errors, bounded concurrency) against a stdlib fake OpenAI server, the
triple parser, and the grounded teacher (deterministic, grounded in the ontology, incorrect answers differ)."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from preflexor.errors import UserError
from preflexor.teacher import HTTPTeacher


class FakeOpenAI:
    """A tiny OpenAI-compatible chat server: fails the first `fail_first` requests with `fail_code`, then echoes."""

    def __init__(self, fail_first=0, fail_code=503, delay=0.0, reply=None):
        self.fail_first, self.fail_code, self.delay = fail_first, fail_code, delay
        self.reply = reply or (lambda body: "echo: " + body["messages"][-1]["content"][:40])
        self.requests, self.in_flight, self.max_in_flight = [], 0, 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append((self.path, dict(self.headers), body))
                    n = len(fake.requests)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    time.sleep(fake.delay)
                    if n <= fake.fail_first:
                        self.send_response(fake.fail_code)
                        self.end_headers()
                        self.wfile.write(b'{"error": "busy"}')
                        return
                    text = fake.reply(body)
                    out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(**kw):
        servers.append(FakeOpenAI(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_http_request_format_and_auth(fake, monkeypatch):
    srv = fake()
    monkeypatch.setenv("MY_KEY", "sekret")
    t = HTTPTeacher(srv.url, model="m1", api_key_env="MY_KEY")
    out = t.complete([{"role": "user", "content": "hello"}], temperature=0.3, max_tokens=7)
    assert out == "echo: hello"
    path, headers, body = srv.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sekret"
    assert body == {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "temperature": 0.3,
                    "max_tokens": 7}
    # base URL forms: with or without /v1, or the full endpoint
    for url in (srv.url[:-3], srv.url + "/", srv.url + "/chat/completions"):
        assert HTTPTeacher(url).url == srv.url + "/chat/completions"
    monkeypatch.delenv("MY_KEY")
    t.complete([{"role": "user", "content": "x"}])
    assert "Authorization" not in srv.requests[-1][1]  # no key in the environment: no header (local servers)


def test_http_retries_5xx_and_429(fake):
    for code in (503, 429):
        srv = fake(fail_first=2, fail_code=code)
        t = HTTPTeacher(srv.url, backoff=0.01, max_retries=3)
        assert t.complete([{"role": "user", "content": "q"}]) == "echo: q"
        assert len(srv.requests) == 3 and t.retries == 2


def test_http_gives_up_with_one_clear_error(fake):
    srv = fake(fail_first=100)
    t = HTTPTeacher(srv.url, backoff=0.01, max_retries=2)
    with pytest.raises(UserError, match=r"failed after 3 attempts \(HTTP 503"):
        t.complete([{"role": "user", "content": "q"}])
    assert len(srv.requests) == 3
    srv = fake(fail_first=100, fail_code=401)  # a client error is not retried
    with pytest.raises(UserError, match="HTTP 401"):
        HTTPTeacher(srv.url, backoff=0.01).complete([{"role": "user", "content": "q"}])
    assert len(srv.requests) == 1
    # nothing listening: connection refused is retried, then reported
    port = srv.server.server_address[1]
    srv.close()
    with pytest.raises(UserError, match="failed after 2 attempts"):
        HTTPTeacher(f"http://127.0.0.1:{port}", backoff=0.01, max_retries=1).complete([{"role": "user",
                                                                                       "content": "q"}])
    with pytest.raises(UserError, match="must start with http"):
        HTTPTeacher("localhost:8000")


def test_http_complete_many_is_concurrent_but_bounded(fake):
    srv = fake(delay=0.2)
    t = HTTPTeacher(srv.url, max_concurrency=3)
    msgs = [[{"role": "user", "content": f"m{i}"}] for i in range(9)]
    t0 = time.perf_counter()
    outs = t.complete_many(msgs)
    dt = time.perf_counter() - t0
    assert outs == [f"echo: m{i}" for i in range(9)]  # order kept
    assert srv.max_in_flight == 3
    assert dt < 9 * 0.2 * 0.6, dt  # 3 waves of 0.2 s, not 9 sequential requests


def test_llm_data_methods_send_structured_prompts(fake):
    srv = fake()
    t = HTTPTeacher(srv.url)
    sections = t.thinking_sections("Why is bone tough?", "bone: a tissue", ["bone"])
    assert list(sections) == ["Reasoning Steps", "Relevant Materials or Concepts", "Design Principles",
                              "Material Properties", "Hypothesis", "Additional Background"]
    prompts = [r[2]["messages"][-1]["content"] for r in srv.requests]
    assert all(p.startswith("Question: Why is bone tough?") for p in prompts)
    assert sum('"Design Principles"' in p for p in prompts) == 1


# -- grounded teacher -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onto():
    from preflexor.corpus import load_corpus
    from preflexor.graph import KnowledgeGraph

    docs, chunks = load_corpus("ontology")
    return docs, chunks, KnowledgeGraph.from_corpus(docs, chunks)


def test_grounded_teacher_checkable_against_ontology(onto):
    from preflexor.teacher import CATEGORIES, BACKGROUND, GroundedTeacher, clean_definition

    docs, chunks, graph = onto
    t = GroundedTeacher(docs, chunks, graph, seed=3)
    by_term = {d.doc_id: d for d in docs}
    bone = next(c for c in chunks if c.meta.get("label") == "bone tissue")
    q = t.question_for([bone])
    assert "bone tissue" in q and t.focus_of(q) == "UBERON:0002481"
    parents = {by_term[p].meta["label"] for p, d in by_term["UBERON:0002481"].meta["ancestors"].items() if d == 1}
    assert any(p in q for p in parents)  # the question names one of its ontology parents
    a = t.answer(q, "")
    assert clean_definition(bone.text.split(": ", 1)[1]) in a and all(p in a for p in parents)
    wrong = t.incorrect_answer(q)
    decoy = by_term[t.decoy_of(q)]
    assert decoy.doc_id != "UBERON:0002481" and clean_definition(decoy.text.split(": ", 1)[1]) in wrong
    assert clean_definition(bone.text.split(": ", 1)[1]) not in wrong
    s = t.thinking_sections(q, bone.text, ["bone tissue"])
    assert list(s) == [*CATEGORIES, BACKGROUND] and all(s.values())
    assert "bone tissue" in s["Reasoning Steps"] and s["Reasoning Steps"].startswith("1. ")
    # deterministic for a seed and independent of call order; a fresh teacher recovers the focus from the text
    t2 = GroundedTeacher(docs, chunks, graph, seed=3)
    assert t2.answer(q, "") == a and t2.incorrect_answer(q) == wrong and t2.question_for([bone]) == q
    qs = {GroundedTeacher(docs, chunks, graph, seed=s).question_for([bone]) for s in range(8)}
    assert len(qs) >= 3  # wording varies with the seed
    kg = t.knowledge_graph(q, "", graph.neighbourhood("bone tissue") + [("x", "is_a", "y")])
    assert kg[0][0] == "bone tissue" or kg[0][2] == "bone tissue"
    with pytest.raises(UserError, match="no known concept"):
        t.answer("What is zzzz?", "")


def test_grounded_teacher_on_a_plain_text_corpus(tmp_path):
    from preflexor.corpus import load_corpus
    from preflexor.graph import KnowledgeGraph
    from preflexor.teacher import GroundedTeacher

    (tmp_path / "silk.txt").write_text("Spider silk is a protein fibre spun by spiders. It is tough and elastic.")
    (tmp_path / "nacre.md").write_text("# Nacre\nNacre is an organic-inorganic composite found in mollusc shells.")
    docs, chunks = load_corpus(tmp_path)
    t = GroundedTeacher(docs, chunks, KnowledgeGraph.from_corpus(docs, chunks), seed=0)
    q = t.question_for(chunks[:1])
    assert "Nacre" in q or "nacre" in q
    assert "organic-inorganic composite" in t.answer(q, "")
    assert "tough and elastic" in t.incorrect_answer(q)  # the only other document


def test_local_teacher_batches_with_the_sampler(tiny_llama_dir):
    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.teacher import LocalTeacher

    model, tok = load_model_and_tokenizer(tiny_llama_dir)
    t = LocalTeacher(model, tok, seed=0, max_tokens=4)
    msgs = [[{"role": "user", "content": "What is bone?"}], [{"role": "user", "content": "What is silk made of?"}]]
    outs = t.complete_many(msgs, temperature=1.0, max_tokens=5)
    assert len(outs) == 2 and all(isinstance(o, str) and o for o in outs)
    assert LocalTeacher(model, tok, seed=0).complete_many(msgs, temperature=1.0, max_tokens=5) == outs  # seeded
    greedy = t.complete(msgs[0], temperature=0.0, max_tokens=5)
    assert greedy == t.complete(msgs[0], temperature=0.0, max_tokens=5)
    s = t.thinking_sections("What is bone?", "bone: a tissue")  # the LLM data methods work on the local backend
    assert len(s) == 6
