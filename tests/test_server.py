"""The OpenAI-compatible server, started as a real process on the embedded SmolLM2 (`python -m preflexor.server`),
driven by the official `openai` client and by plain HTTP: answers equal the in-process sampler's, streaming, n=2,
stop strings, every bad request is a 400 with an OpenAI-style error, and eight concurrent clients get their own
answers. The `recursive` hook is tested in-process with a stub reasoner."""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from preflexor.errors import UserError
from preflexor.sampler import generate_ex
from preflexor.server import ChoiceText, build_server

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is spider silk made of?", "Name a property of bone.", "Why is nacre tough?",
             "What is collagen?", "Describe tendon in one sentence.", "What is keratin?",
             "How strong is silk compared with steel?", "What does cartilage do?"]


@pytest.fixture(scope="module")
def server(smollm2_dir):
    """Base URL of a server process (free port chosen by the OS); killed when the module's tests are done."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "preflexor.server", "--model", MODEL, "--port", "0",
                             "--max-tokens-limit", "64", "--max-prompt-tokens", "200"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen, url = [], None
        timer = threading.Timer(300, proc.kill)  # a server that never comes up ends the wait below
        timer.start()
        for line in proc.stderr:
            seen.append(line)
            if m := re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line):
                url = m.group(1)
                break
        timer.cancel()
        assert url, "server did not start:\n" + "".join(seen)
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        with urllib.request.urlopen(url + "/health", timeout=60) as r:
            assert json.loads(r.read())["status"] == "ok"
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local(smollm2_dir):
    """The same model and tokenizer in this process, for the expected answers."""
    from preflexor.checkpoint import load_model_and_tokenizer

    return load_model_and_tokenizer(MODEL)


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="x", timeout=300, max_retries=0)


def expected(local, question: str, max_tokens: int, **kw):
    """(text, GenerationResult) our sampler gives for one chat question alone."""
    model, tok = local
    ids = tok.encode_chat([{"role": "user", "content": question}], allow_special=True)
    res = generate_ex(model, [ids], max_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id, **kw)
    return tok.decode(res.tokens[0][0], skip_special=True), res


def post(url: str, body, path="/v1/chat/completions", headers=None) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                 **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read().decode()
            return r.status, (json.loads(raw) if r.headers["Content-Type"] == "application/json" else raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_health_models_and_unknown_route(server):
    with urllib.request.urlopen(server + "/health", timeout=30) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    status, err = post(server, {"messages": user("hi")}, path="/v1/completions")
    assert status == 404 and err["error"]["code"] == "not_found"


def test_completion_openai_client_and_plain_http(server, local):
    text, res = expected(local, QUESTIONS[0], 12)
    r = client(server).chat.completions.create(model=MODEL, messages=user(QUESTIONS[0]), max_tokens=12,
                                               temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and text.strip()
    assert r.choices[0].finish_reason == res.finish_reasons[0][0]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (res.prompt_tokens[0], len(res.tokens[0][0]))
    status, out = post(server, {"model": MODEL, "messages": user(QUESTIONS[0]), "max_tokens": 12,
                                "temperature": 0.0})
    assert status == 200 and out["choices"][0]["message"]["content"] == text


def test_streamed_completion(server, local):
    text, res = expected(local, QUESTIONS[1], 12)
    chunks = list(client(server).chat.completions.create(
        model=MODEL, messages=user(QUESTIONS[1]), max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == res.finish_reasons[0][0]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(res.tokens[0][0])
    status, raw = post(server, {"messages": user(QUESTIONS[1]), "max_tokens": 4, "temperature": 0,
                                "stream": True})
    events = [e for e in raw.split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_n2_seeded_sampling(server, local):
    body = dict(model=MODEL, messages=user(QUESTIONS[2]), max_tokens=8, temperature=1.0, top_p=0.9, n=2, seed=7)
    r = client(server).chat.completions.create(**body)
    again = client(server).chat.completions.create(**body)
    got = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1] and got == [c.message.content for c in again.choices]
    want = [expected(local, QUESTIONS[2], 8, temperature=1.0, top_p=0.9, seed=7 + j)[0] for j in range(2)]
    assert got == want  # choice j draws with seed + j, as the sampler documents
    assert r.usage.completion_tokens <= 16


def test_stop_strings_cut_the_text(server, local):
    text, _ = expected(local, QUESTIONS[0], 12)
    stop = text.split()[3]  # a word in the middle of the answer
    cut = text[:text.index(stop)]
    r = client(server).chat.completions.create(model=MODEL, messages=user(QUESTIONS[0]), max_tokens=12,
                                               temperature=0, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 12  # generation ended at the stop string
    chunks = client(server).chat.completions.create(model=MODEL, messages=user(QUESTIONS[0]), max_tokens=12,
                                                    temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut


def test_choice_text_holds_back_partial_stop_strings(local):
    _, tok = local
    ct = ChoiceText(tok, ["STOP here"])
    deltas = []
    for t in tok.encode("héllo wörld 😀 then STOP here and more"):
        stopped = ct.add(t)
        deltas.append(ct.delta())
        if stopped:
            break
    deltas.append(ct.delta(final=True))
    assert "".join(deltas) == "héllo wörld 😀 then " and all("\ufffd" not in d and "STOP" not in d for d in deltas)


BAD = [  # (body, param, code)
    (b'{"messages": [', None, "invalid_json"),
    (b"\xff\xfe not utf-8", None, "invalid_json"),
    ([1, 2], None, "invalid_type"),
    ({"model": MODEL}, "messages", "missing_required_parameter"),
    ({"messages": "hi"}, "messages", "invalid_type"),
    ({"messages": []}, "messages", "invalid_type"),
    ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ({"messages": user("hi"), "temperature": "hot"}, "temperature", "invalid_type"),
    ({"messages": user("hi"), "temperature": 5}, "temperature", "invalid_value"),
    ({"messages": user("hi"), "top_p": 0}, "top_p", "invalid_value"),
    ({"messages": user("hi"), "n": 0}, "n", "invalid_value"),
    ({"messages": user("hi"), "n": 1.5}, "n", "invalid_type"),
    ({"messages": user("hi"), "n": True}, "n", "invalid_type"),
    ({"messages": user("hi"), "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"messages": user("hi"), "max_tokens": 65}, "max_tokens", "invalid_value"),
    ({"messages": user("hi"), "max_tokens": "8"}, "max_tokens", "invalid_type"),
    ({"messages": user("hi"), "stop": 5}, "stop", "invalid_type"),
    ({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"messages": user("hi"), "seed": "x"}, "seed", "invalid_type"),
    ({"messages": user("hi"), "stream": "yes"}, "stream", "invalid_type"),
    ({"messages": user("hi"), "model": 3}, "model", "invalid_type"),
    ({"messages": user("silk " * 300)}, "messages", "context_length_exceeded"),
    ({"messages": user("hi"), "recursive": 2}, "recursive", "unsupported_parameter"),
    ({"messages": user("hi"), "continue_final_message": True}, "messages", "invalid_value"),
]


@pytest.mark.parametrize("body, param, code", BAD, ids=[f"{i}-{c}" for i, (_, _, c) in enumerate(BAD)])
def test_bad_request_is_400_with_openai_error(server, body, param, code):
    status, out = post(server, body)
    assert status == 400, out
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["message"]
    assert (out["error"]["param"], out["error"]["code"]) == (param, code)


def test_oversized_and_length_less_bodies_are_400_and_server_keeps_serving(server):
    big = json.dumps({"messages": user("x" * (2 << 20))}).encode()
    status, out = post(server, big)
    assert status == 400 and out["error"]["code"] == "request_too_large"
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:  # no Content-Length
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        reply = s.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.1 400") and '"missing_content_length"' in reply
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        client(server).chat.completions.create(model=MODEL, messages=user("hi"), temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    r = client(server).chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_client_that_disconnects_mid_stream_does_not_stop_the_server(server):
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"messages": user(QUESTIONS[3]), "max_tokens": 64, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: {")
    conn.close()
    r = client(server).chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2, temperature=0)
    assert r.choices[0].message.content is not None


def test_eight_concurrent_clients_get_their_own_answers(server, local):
    want = [expected(local, q, 8)[0] for q in QUESTIONS]
    got: list = [None] * 8
    barrier = threading.Barrier(8)

    def ask(i: int) -> None:
        barrier.wait()
        c = client(server)
        if i % 2:
            chunks = c.chat.completions.create(model=MODEL, messages=user(QUESTIONS[i]), max_tokens=8,
                                               temperature=0, stream=True)
            got[i] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        else:
            got[i] = c.chat.completions.create(model=MODEL, messages=user(QUESTIONS[i]), max_tokens=8,
                                               temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert got == want


def test_recursive_requests_call_the_reasoner(tiny_llama_dir):
    from preflexor.checkpoint import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_llama_dir)
    calls = []

    def reasoner(messages, rounds, temperature=0.1, max_tokens=512):
        calls.append((messages, rounds, temperature, max_tokens))
        if messages[-1]["content"] == "fail":
            raise UserError("a recursive request needs a question")
        return {"content": "final <|thinking|>x<|/thinking|> answer", "prompt_tokens": 11, "completion_tokens": 22,
                "trace": {"rounds": rounds}}

    srv = build_server(model, tok, port=0, model_name="tiny", recursive_fn=reasoner)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = "http://127.0.0.1:%d" % srv.server_address[1]
    try:
        status, out = post(url, {"messages": user("Why?"), "recursive": 3, "temperature": 0.5, "max_tokens": 9})
        assert status == 200 and calls == [(user("Why?"), 3, 0.5, 9)]
        assert out["choices"][0]["message"]["content"] == "final <|thinking|>x<|/thinking|> answer"
        assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}
        assert out["preflexor_trace"] == {"rounds": 3}
        status, out = post(url, {"messages": user("Why?"), "recursive": 2, "n": 2})
        assert status == 400 and out["error"]["param"] == "n"
        status, out = post(url, {"messages": user("fail"), "recursive": 2})
        assert status == 400 and "needs a question" in out["error"]["message"]
        status, out = post(url, {"messages": user("Why?"), "max_tokens": 3, "temperature": 0})  # plain still works
        assert status == 200 and out["usage"]["completion_tokens"] <= 3
    finally:
        srv.shutdown()
        srv.server_close()
