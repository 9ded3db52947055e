"""The server under faults and load (issue 20). One test per defect found by hand, each checking the status, the
OpenAI-style JSON body and that the server still answers correctly afterwards: a client that hangs up is cancelled,
seeds outside int64, too deeply nested JSON and lone surrogates are 400s, the listen backlog holds a burst, a request
target without '/' and the HTTP layer's own errors are JSON, the queue is bounded (503 full, 429 over a client's
share, both with Retry-After), and stalled connections are cut. Then, against a real server process on a random tiny
Llama: 32 clients x 3 requests (every one answered 200 or 503) and a soak of mixed good and bad requests (threads and
RSS of the server process stay within the bounds stated there). Linux only (/proc, 127.0.0.2 on loopback)."""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import preflexor.server as server_mod
from preflexor.sampler import generate_ex
from preflexor.server import LISTEN_BACKLOG, build_server

ROOT = Path(__file__).resolve().parent.parent
HI = [{"role": "user", "content": "hi"}]
QUESTIONS = ["What is silk?", "Name a bone.", "Why is nacre tough?", "What is collagen?"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from preflexor.checkpoint import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_llama_dir)


def expected(tiny, question: str, max_tokens: int) -> str:
    """The greedy answer our sampler gives for one question alone (what the server must return, batched or not)."""
    model, tok = tiny
    ids = tok.encode_chat([{"role": "user", "content": question}], allow_special=True)
    res = generate_ex(model, [ids], max_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    return tok.decode(res.tokens[0][0], skip_special=True)


@contextmanager
def running(tiny, **limits):
    """An in-process server on a free port (yields the port); shut down and closed on exit."""
    srv = build_server(*tiny, port=0, max_tokens_limit=256, **limits)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def port(tiny):
    with running(tiny, read_timeout=10) as p:
        yield p


def post(port: int, body, source: str = "127.0.0.1", timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, lower-cased headers, JSON body) of one POST /v1/chat/completions on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("POST", "/v1/chat/completions", body if isinstance(body, bytes) else json.dumps(body),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read())
    finally:
        conn.close()


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def exchange(port: int, data: bytes, timeout: float = 10) -> tuple[int | None, dict, bytes, float]:
    """Send raw bytes and read until the server closes the connection: (status, headers, body, seconds to EOF).
    A server that keeps the connection open fails the test with a TimeoutError."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        t0 = time.monotonic()
        s.sendall(data)
        chunks = []
        while b := s.recv(1 << 16):
            chunks.append(b)
        elapsed = time.monotonic() - t0
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head:
        return None, {}, b"", elapsed
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body, elapsed


def post_bytes(body: bytes) -> bytes:
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body)


def assert_error(body: dict | bytes, param=None, code=None) -> dict:
    out = json.loads(body) if isinstance(body, bytes) else body
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}, out
    assert out["error"]["message"] and out["error"]["type"]
    if code is not None:
        assert (out["error"]["param"], out["error"]["code"]) == (param, code), out
    return out["error"]


def assert_serves(port: int, tiny) -> None:
    """The server still answers a plain request, with the sampler's own answer."""
    status, _, out = post(port, {"messages": HI, "max_tokens": 4, "temperature": 0})
    assert status == 200 and out["choices"][0]["message"]["content"] == expected(tiny, "hi", 4)


def wait_until(cond, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def gate(monkeypatch):
    """Hold the model worker before each sampler call until `gate.set()`: requests stay running or queued."""
    ev, real = threading.Event(), server_mod.generate_ex

    def held(*args, **kw):
        ev.wait(60)
        return real(*args, **kw)

    monkeypatch.setattr(server_mod, "generate_ex", held)
    yield ev
    ev.set()


@pytest.fixture
def slow(monkeypatch):
    """Make every generated token take 20 ms; the list counts the tokens generated."""
    tokens, real = [], server_mod.generate_ex

    def slowed(*args, on_token, **kw):
        def each(row: int, token: int) -> bool:
            time.sleep(0.02)
            tokens.append(token)
            return on_token(row, token)
        return real(*args, on_token=each, **kw)

    monkeypatch.setattr(server_mod, "generate_ex", slowed)
    return tokens


def send_and_hang_up(port: int, body: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    time.sleep(0.3)
    conn.close()


# -- 1. a client that has gone is cancelled -------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_running_request_of_a_gone_client_is_cancelled(port, tiny, slow, stream):
    t0 = time.monotonic()
    send_and_hang_up(port, {"messages": HI, "max_tokens": 200, "temperature": 0, "stream": stream})  # 4 s if run out
    assert wait_until(lambda: health(port)["queue_rows"] == 0, 3)
    assert len(slow) < 100, f"{len(slow)} of 200 tokens generated after the client left"
    slow.clear()
    assert_serves(port, tiny)
    assert time.monotonic() - t0 < 4


def test_queued_requests_of_gone_clients_are_dropped(port, tiny, gate):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # holds the worker
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": HI, "max_tokens": 4, "temperature": 0}))
    assert wait_until(lambda: health(port)["queue_rows"] == 1)
    for stream in (False, True):  # queued behind it, then the client leaves
        send_and_hang_up(port, {"messages": HI, "max_tokens": 8, "n": 3, "stream": stream})
    assert wait_until(lambda: health(port)["queue_rows"] == 1, 2)
    gate.set()
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["choices"][0]["message"]["content"] == expected(tiny, "hi", 4)
    conn.close()
    assert wait_until(lambda: health(port)["queue_rows"] == 0)
    assert_serves(port, tiny)


# -- 2. seeds outside int64 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2 ** 70, 2 ** 63, -2 ** 63 - 1])
def test_seed_outside_int64_is_400(port, tiny, seed):
    status, _, out = post(port, {"messages": HI, "max_tokens": 2, "temperature": 1, "seed": seed})
    assert status == 400
    assert_error(out, "seed", "invalid_value")
    assert_serves(port, tiny)


def test_seed_at_the_int64_edges_is_served(port):
    for seed in (2 ** 63 - 1, -2 ** 63):  # seed + j for n=16 still fits torch's generator
        status, _, out = post(port, {"messages": HI, "max_tokens": 2, "temperature": 1, "seed": seed, "n": 16})
        assert status == 200 and len(out["choices"]) == 16


# -- 3. nested JSON, huge integers, lone surrogates -----------------------------------------------------------------
@pytest.mark.parametrize("body, param, code", [
    (b"[" * 100_000, None, "invalid_json"),
    (b'{"messages": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}", None, "invalid_json"),
    (b'{"messages": [], "n": ' + b"1" * 5000 + b"}", None, "invalid_json"),  # over Python's int-digit limit
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "text", '
     b'"text": "\\udfff"}]}]}', "messages[1].content", "invalid_value"),
], ids=["array-nesting", "object-nesting", "int-digits", "surrogate", "surrogate-in-part"])
def test_unparseable_bodies_are_400(port, tiny, body, param, code):
    status, headers, out, _ = exchange(port, post_bytes(body))
    assert status == 400 and headers["content-type"] == "application/json"
    assert_error(out, param, code)
    assert_serves(port, tiny)


# -- 4. the listen backlog holds a burst ----------------------------------------------------------------------------
def test_backlog_holds_a_burst_of_connections(tiny):
    if int(Path("/proc/sys/net/core/somaxconn").read_text()) < 64:
        pytest.skip("net.core.somaxconn caps the backlog below 64")
    srv = build_server(*tiny, port=0)
    assert srv.request_queue_size == LISTEN_BACKLOG == 128
    try:  # nothing accepts yet: with http.server's backlog of 5 the 7th connect would wait for a SYN retry (1 s)
        socks = [socket.create_connection(srv.server_address, timeout=0.5) for _ in range(64)]
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        for s in socks:
            s.sendall(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        for s in socks:
            s.settimeout(30)
            assert s.makefile("rb").read().startswith(b"HTTP/1.1 200")
            s.close()
    finally:
        srv.shutdown()
        srv.server_close()


# -- 5 and 6. the HTTP layer's errors are JSON, answered at once -------------------------------------------------------
LONG = b"a" * (1 << 16)
HTTP_ERRORS = [  # (raw request, status); every one small enough (or read whole) that closing sends no RST
    (b"GET v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"POST v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health HTTP/x.y\r\n\r\n", 400),
    (b"GET /health HTTP/3.0\r\n\r\n", 505),
    (b"PUT /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    (b"GET /" + LONG[:65537 - 5], 414),  # exactly readline's limit + 1: nothing left unread
    (b"GET /health HTTP/1.1\r\n" + b"X-Big: " + LONG[:65537 - 7], 431),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431),
]


@pytest.mark.parametrize("raw, status", HTTP_ERRORS, ids=[f"{s}-{r[:12]!r}" for r, s in HTTP_ERRORS])
def test_http_layer_errors_are_json_and_close_at_once(port, tiny, raw, status):
    got, headers, body, elapsed = exchange(port, raw)
    assert got == status and headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    err = assert_error(body)
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error") and err["code"]
    assert elapsed < 5  # not left to the read timeout (10 s here)
    assert_serves(port, tiny)


# -- 7. a bounded queue with a per-client share ----------------------------------------------------------------------
def test_queue_limits_answer_429_and_503_with_retry_after(tiny, gate):
    with running(tiny, max_queue_rows=4, max_client_rows=3) as p:
        conns = []

        def queue_one(n: int, source: str) -> None:
            c = http.client.HTTPConnection("127.0.0.1", p, timeout=60, source_address=(source, 0))
            c.request("POST", "/v1/chat/completions", json.dumps({"messages": HI, "max_tokens": 2, "n": n,
                                                                  "temperature": 0}))
            conns.append(c)

        queue_one(2, "127.0.0.1")  # running (held): client A has 2 rows
        queue_one(1, "127.0.0.1")  # queued: A has 3, its whole share
        assert wait_until(lambda: health(p)["queue_rows"] == 3)
        status, headers, out = post(p, {"messages": HI, "max_tokens": 2})
        assert status == 429 and headers["retry-after"] == "1"
        assert_error(out, None, "rate_limit_exceeded")
        queue_one(1, "127.0.0.2")  # client B (another loopback address) fills the queue: 4 of 4 rows
        assert wait_until(lambda: health(p)["queue_rows"] == 4)
        status, headers, out = post(p, {"messages": HI, "max_tokens": 2}, source="127.0.0.2")
        assert status == 503 and headers["retry-after"] == "1"
        assert_error(out, None, "server_overloaded")
        status, _, out = post(p, {"messages": HI, "max_tokens": 2, "n": 4}, source="127.0.0.3")
        assert status == 400  # n over the share could never fit: not worth a retry
        assert_error(out, "n", "invalid_value")
        gate.set()
        for c in conns:
            assert c.getresponse().status == 200
            c.close()
        assert wait_until(lambda: health(p)["queue_rows"] == 0)
        assert_serves(p, tiny)


def test_limits_must_be_positive(tiny):
    from preflexor.errors import UserError

    with pytest.raises(UserError, match="--max-queue-rows must be > 0"):
        build_server(*tiny, port=0, max_queue_rows=0)


# -- 8. stalled connections are cut ----------------------------------------------------------------------------------
def test_stalled_connections_are_cut_without_leaking_threads(tiny):
    with running(tiny, read_timeout=0.5) as p:
        before = threading.active_count()
        for partial in (b"", b"POST /v1/chat/comp", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Le"):
            status, _, _, elapsed = exchange(p, partial)  # idle, mid request line, mid headers: closed, no answer
            assert status is None and elapsed < 5
        status, headers, body, elapsed = exchange(
            p, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"messages\"")
        assert status == 408 and headers["connection"] == "close" and elapsed < 5
        assert_error(body, None, "request_timeout")
        assert wait_until(lambda: threading.active_count() <= before)
        assert_serves(p, tiny)


# -- a real server process: load and soak ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def proc_server(tiny_llama_dir):
    """(port, pid) of `python -m preflexor.server` on the random tiny Llama, queue limited to 16 rows (so a burst of
    32 clients meets 503s) and every client IP allowed all of them (the load test's clients share 127.0.0.1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "preflexor.server", "--model", str(tiny_llama_dir), "--port", "0",
                             "--max-tokens-limit", "16", "--max-queue-rows", "16", "--max-client-rows", "16",
                             "--read-timeout", "1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen, port = [], None
        timer = threading.Timer(120, proc.kill)  # a server that never comes up ends the wait below
        timer.start()
        for line in proc.stderr:
            seen.append(line)
            if m := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line):
                port = int(m.group(1))
                break
        timer.cancel()
        assert port, "server did not start:\n" + "".join(seen)
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield port, proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=30)


def proc_status(pid: int) -> tuple[int, int]:
    """(threads, resident KiB) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


def ask(port: int, question: str, stream: bool) -> tuple[int, dict, str | dict]:
    """(status, headers, answer text or error body) of one greedy 8-token request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": question}],
                                                                 "max_tokens": 8, "temperature": 0,
                                                                 "stream": stream}))
        r = conn.getresponse()
        headers, raw = {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()
    if r.status != 200:
        return r.status, headers, json.loads(raw)
    if not stream:
        return 200, headers, json.loads(raw)["choices"][0]["message"]["content"]
    events = [json.loads(e[6:]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    return 200, headers, "".join(c["delta"].get("content", "") for e in events for c in e["choices"])


def test_load_32_clients_x_3_requests(proc_server, tiny):
    port, pid = proc_server
    want = {q: expected(tiny, q, 8) for q in QUESTIONS}
    results, barrier = [], threading.Barrier(32)

    def client(i: int) -> None:
        barrier.wait()
        for k in range(3):
            q = QUESTIONS[(i + k) % len(QUESTIONS)]
            t0 = time.monotonic()
            try:
                status, headers, out = ask(port, q, stream=k == 2)
            except OSError as e:  # refused, reset, timed out: no answer
                status, headers, out = None, {}, repr(e)
            results.append((status, headers, q, out, time.monotonic() - t0))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    lat = sorted(r[4] for r in results)
    n200, n503 = sum(r[0] == 200 for r in results), sum(r[0] == 503 for r in results)
    print(f"\nload: requests=96 answered={n200 + n503} n200={n200} n503={n503} "
          f"p50={lat[len(lat) // 2] * 1000:.0f}ms p99={lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000:.0f}ms")
    assert len(results) == 96 and n200 + n503 == 96, [r for r in results if r[0] not in (200, 503)][:3]
    for status, headers, q, out, _ in results:
        if status == 200:
            assert out == want[q]  # batched with strangers, the same answer as alone
        else:
            assert headers["retry-after"] and assert_error(out)["code"] == "server_overloaded"
    assert wait_until(lambda: health(port)["queue_rows"] == 0)
    assert ask(port, QUESTIONS[0], stream=False)[2] == want[QUESTIONS[0]]


def soak_requests(port: int) -> list:
    """One round of 12 kinds of request, good and bad; each function checks its own answer."""
    good = json.dumps({"messages": HI, "max_tokens": 3, "temperature": 0}).encode()

    def ok(stream):
        return lambda: ask(port, "hi", stream)[0] == 200

    def bad(raw: bytes, status: int):
        return lambda: exchange(port, raw)[0] == status

    def hang_up(raw: bytes):
        def run():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(raw)
            return True
        return run

    return [ok(False), ok(True), bad(post_bytes(b"[" * 100_000), 400),
            bad(post_bytes(b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), 400),
            bad(post_bytes(b'{"messages": [{"role": "user", "content": "x"}], "seed": %d}' % 2 ** 70), 400),
            bad(post_bytes(b'{"messages": ['), 400), bad(b"GET v1/models HTTP/1.1\r\n\r\n", 400),
            bad(b"PUT / HTTP/1.1\r\n\r\n", 501),
            bad(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 9\r\n\r\n{", 408),  # 1 s read timeout
            hang_up(post_bytes(good.replace(b'"max_tokens": 3', b'"max_tokens": 16'))),  # leaves before the answer
            hang_up(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Le"),  # leaves mid headers
            ok(False)]


def test_soak_mixed_requests_keep_threads_and_memory_bounded(proc_server, tiny):
    """300 requests (25 rounds of 12 kinds, 6 clients at a time) after a warm-up round. Bounds: the server process
    ends with at most 2 threads more than after the warm-up (handler threads all end), and its RSS grows by less
    than 64 MiB."""
    from concurrent.futures import ThreadPoolExecutor

    port, pid = proc_server
    for check in soak_requests(port):  # warm-up: lazily created threads and buffers
        assert check()
    assert wait_until(lambda: health(port)["queue_rows"] == 0)
    threads0, rss0 = proc_status(pid)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(check) for _ in range(25) for check in soak_requests(port)]
        failed = [i for i, f in enumerate(futures) if not f.result()]
    assert not failed, f"{len(failed)} of {len(futures)} answers were wrong, e.g. kind {failed[0] % 12}"
    assert wait_until(lambda: health(port)["queue_rows"] == 0)
    assert wait_until(lambda: proc_status(pid)[0] <= threads0 + 2, 10), proc_status(pid)
    threads, rss = proc_status(pid)
    print(f"\nsoak: requests={len(futures)} threads {threads0}->{threads} rss {rss0 // 1024}->{rss // 1024} MiB")
    assert rss - rss0 < 64 * 1024
    assert ask(port, "hi", stream=False)[2] == expected(tiny, "hi", 8)
