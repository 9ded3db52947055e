"""An OpenAI-compatible chat-completions server for a preflexor model, on the standard library only.

`POST /v1/chat/completions` (temperature, top_p, top_k, max_tokens / max_completion_tokens, n, stop, seed, stream
with stream_options.include_usage, vLLM's `continue_final_message` and `add_generation_prompt`, and `recursive: N`
when built with a recursive reasoner), `GET /v1/models`, `GET /health`. One worker thread owns the model and
batches queued requests whose sampling settings agree (greedy ones always do) into one `generate_ex` call; each
keeps its own prompt, seed, token limit and stop strings, so batching changes no answer. Stop strings end a choice
as tokens arrive, the text cut before them. Reasoning tokens (`<|thinking|>`, ...) are encoded as single ids and
kept in the reply as text; template control tokens are dropped. Bad requests (malformed or too deeply nested JSON,
text that is not valid Unicode, wrong fields, a seed outside int64, a prompt over `max_prompt_tokens`, a body over
`MAX_BODY_BYTES`) get HTTP 400 with an OpenAI-style `{"error": {"message", "type", "param", "code"}}` and the server
keeps serving; so do the HTTP layer's own errors (a broken request line, headers too large, an unknown method).
It binds 127.0.0.1 by default.

Limits under load (module constants are the defaults; `build_server`/`serve` arguments and the CLI flags change them):
- Queue: at most `max_queue_rows` (`MAX_QUEUE_ROWS`, --max-queue-rows) rows (requests x n) queued or running, and at
  most `max_client_rows` (`MAX_CLIENT_ROWS`, --max-client-rows) of them from one client IP. Past them a request gets
  503 (server full) or 429 (over its share) with a `Retry-After` header, never a refused connection; a request with
  n above the share is a 400.
- A request whose client has closed its connection is cancelled: while it waits, its handler checks the socket every
  `POLL_S` seconds, and the worker drops its rows at the next token (or before they start).
- Every socket read or write may block at most `read_timeout` seconds (`READ_TIMEOUT_S`, --read-timeout): a client
  that stalls mid-request, or idles on a kept-alive connection, is cut and its thread ends; a stalled body gets 408.
- The listen backlog is `backlog` (`LISTEN_BACKLOG`, --backlog; the kernel caps it at net.core.somaxconn), so a burst
  of connections waits to be accepted instead of being refused.
"""
from __future__ import annotations

import argparse
import collections
import json
import queue
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from preflexor.errors import UserError, exit_on_user_error
from preflexor.sampler import FINISH_STOP, generate_ex

MAX_BODY_BYTES = 1 << 20  # larger bodies are refused (and drained up to DRAIN_BYTES so the client reads the 400)
DRAIN_BYTES = 64 << 20
MAX_N = 16
MAX_STOP = 4  # as OpenAI
MAX_BATCH_ROWS = 16  # rows (requests x n) the worker batches into one sampler call
MAX_QUEUE_ROWS = 64  # rows queued or running, all clients together (4 full batches); past it a 503
MAX_CLIENT_ROWS = 32  # rows queued or running from one client IP (two n=16 requests); past it a 429
RETRY_AFTER_S = 1  # the Retry-After of a 503 / 429
READ_TIMEOUT_S = 30.0  # seconds one socket read or write may block
LISTEN_BACKLOG = 128  # connections the kernel holds before accept (http.server's default of 5 refuses bursts)
POLL_S = 0.25  # how often a waiting request checks that its client is still connected
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 63 - 1  # int64, as OpenAI; seed + j (j < MAX_N) still fits torch's 64 bits
ROLES = ("system", "user", "assistant", "developer", "tool")

RecursiveFn = Callable[..., "str | dict"]


class RequestError(Exception):
    """A client mistake, answered with HTTP `status` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", retry_after: int | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -- request validation -----------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    messages: list[dict]
    prompt_ids: list[int]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_tokens: int = 256
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    recursive: int | None = None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _get(body: dict, key: str, is_type: Callable, want: str, default=None, valid: Callable | None = None):
    """body[key] when present and not null, checked for type and then value; a 400 naming the key otherwise."""
    v = body.get(key)
    if v is None:
        return default
    if not is_type(v) or (valid is not None and not valid(v)):
        raise RequestError(f"'{key}' must be {want}, got {json.dumps(v)[:60]}", param=key,
                           code="invalid_type" if not is_type(v) else "invalid_value")
    return v


def _content_text(content, i: int) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts",
                       param=f"messages[{i}].content", code="invalid_type")


def _check_unicode(text: str, param: str) -> str:
    """JSON's \\u escapes can carry lone surrogates ("\\ud800"), which are no text: the tokenizer cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} is not valid Unicode (a lone surrogate at character {e.start})", param=param,
                           code="invalid_value") from None
    return text


def parse_messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages",
                           code="invalid_type" if raw is not None else "missing_required_parameter")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]",
                               code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}",
                               param=f"messages[{i}].role", code="invalid_value")
        content = _check_unicode(_content_text(m.get("content"), i), f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_request(body, tokenizer, max_prompt_tokens: int, max_tokens_limit: int, context: int) -> ChatRequest:
    """Validate a decoded JSON body and encode its prompt; every problem is a `RequestError` naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_type")
    if "messages" not in body:
        raise RequestError("'messages' is required", param="messages", code="missing_required_parameter")
    messages = parse_messages(body["messages"])
    _get(body, "model", _is_str, "a string")
    temperature = float(_get(body, "temperature", _is_num, "a number in [0, 2]", 1.0, lambda v: 0 <= v <= 2))
    top_p = float(_get(body, "top_p", _is_num, "a number in (0, 1]", 1.0, lambda v: 0 < v <= 1))
    top_k = _get(body, "top_k", _is_int, "an integer >= -1 (-1 or 0: off)", None, lambda v: v >= -1)
    n = _get(body, "n", _is_int, f"an integer in [1, {MAX_N}]", 1, lambda v: 1 <= v <= MAX_N)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, key, _is_int, f"an integer in [1, {max_tokens_limit}]", None,
                      lambda v: 1 <= v <= max_tokens_limit)
    stop = _get(body, "stop", lambda v: _is_str(v) or (isinstance(v, list) and all(map(_is_str, v))),
                f"a string or a list of at most {MAX_STOP} strings", [], lambda v: _is_str(v) or len(v) <= MAX_STOP)
    stop = [s for s in ([stop] if _is_str(stop) else stop) if s]
    seed = _get(body, "seed", _is_int, f"an integer in [{SEED_MIN}, {SEED_MAX}]", None,
                lambda v: SEED_MIN <= v <= SEED_MAX)
    stream = _get(body, "stream", _is_bool, "a boolean", False)
    include_usage = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {}).get("include_usage")
    cont = _get(body, "continue_final_message", _is_bool, "a boolean", False)
    add_gen = _get(body, "add_generation_prompt", _is_bool, "a boolean", not cont)
    recursive = _get(body, "recursive", _is_int, "an integer in [1, 16]", None, lambda v: 1 <= v <= 16)

    if cont and messages[-1]["role"] != "assistant":
        raise RequestError("continue_final_message needs the last message to be the assistant's", param="messages",
                           code="invalid_value")
    try:
        if cont:  # continue a pre-filled assistant turn: the template up to its generation prompt, then the prefix
            ids = tokenizer.encode_chat(messages[:-1], add_generation_prompt=True, allow_special=True)
            ids += tokenizer.encode(messages[-1]["content"], allow_special=True)
        else:
            ids = tokenizer.encode_chat(messages, add_generation_prompt=add_gen, allow_special=True)
    except UserError as e:
        raise RequestError(str(e), param="messages", code="invalid_value") from None
    if len(ids) > max_prompt_tokens:
        raise RequestError(f"the prompt has {len(ids)} tokens, more than this server's limit of {max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")
    room = context - len(ids)
    if max_tokens is None:
        max_tokens = min(max_tokens_limit, room)
    if max_tokens > room:
        raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                           f"{context} tokens", param=key, code="context_length_exceeded")
    return ChatRequest(messages, ids, temperature, top_p, top_k if top_k and top_k > 0 else None, max_tokens, n,
                       stop, seed, stream, include_usage is True, recursive)


# -- incremental text with stop strings ---------------------------------------------------------------------------
class ChoiceText:
    """Text of one choice as its tokens arrive: cut at the first stop string, and `delta()` hands out only text that
    can no longer change (not a partial UTF-8 character, not a possible start of a stop string)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string has appeared (the text is then final)."""
        self.ids.append(token)
        self.text = self.tok.decode(self.ids, skip_special=True)
        cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
        return self.stopped

    def delta(self, final: bool = False) -> str:
        end = len(self.text)
        if not final and not self.stopped:
            while end > self.sent and self.text[end - 1] == "\ufffd":  # an incomplete multi-byte character
                end -= 1
            for s in self.stop:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text[end - k:end] == s[:k]:
                        end -= k
                        break
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


# -- the model worker -----------------------------------------------------------------------------------------------
@dataclass(eq=False)  # jobs are compared by identity (deque.remove)
class Job:
    req: ChatRequest
    client: str = ""  # the client's IP: its share of the queue
    # ("delta", choice index, text) | ("done", {"choices", "usage"}) | ("error", RequestError)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    released: bool = False  # its rows no longer count against the queue limits

    def batch_key(self):
        r = self.req
        if r.recursive is not None:
            return ("recursive", id(self))  # never batched
        return (r.n, 0.0) if r.temperature == 0 else (r.n, r.temperature, r.top_p, r.top_k)


class Engine:
    """Owns the model: one worker thread runs the queued jobs, batching compatible ones. At most `max_queue_rows`
    rows (requests x n) are queued or running, at most `max_client_rows` of them from one client."""

    def __init__(self, model, tokenizer, recursive_fn: RecursiveFn | None = None, max_batch_rows: int = MAX_BATCH_ROWS,
                 max_queue_rows: int = MAX_QUEUE_ROWS, max_client_rows: int = MAX_CLIENT_ROWS):
        self.model, self.tok, self.recursive_fn, self.max_batch_rows = model, tokenizer, recursive_fn, max_batch_rows
        # a share above the whole queue is the whole queue (so an n between them is a 400, not a 503 forever)
        self.max_queue_rows, self.max_client_rows = max_queue_rows, min(max_client_rows, max_queue_rows)
        self._jobs: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self.rows = 0  # rows queued or running
        self._client_rows: collections.Counter[str] = collections.Counter()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="preflexor-model-worker", daemon=True)
        self._thread.start()

    def submit(self, req: ChatRequest, client: str = "") -> Job:
        """Queue a request, or a `RequestError` when its rows do not fit: 503 when the server is full, else 429 when
        the client's share is used up."""
        if req.n > self.max_client_rows:  # would never fit: the client's mistake, not a reason to retry
            raise RequestError(f"n={req.n} is more than this server's {self.max_client_rows} rows per client",
                               param="n", code="invalid_value")
        with self._cv:
            if self.rows + req.n > self.max_queue_rows:
                raise RequestError(f"the server is full ({self.rows} of {self.max_queue_rows} rows queued or "
                                   "running): retry later", code="server_overloaded", status=503,
                                   kind="server_error", retry_after=RETRY_AFTER_S)
            if self._client_rows[client] + req.n > self.max_client_rows:
                raise RequestError(f"this client already has {self._client_rows[client]} rows queued or running, "
                                   f"its share is {self.max_client_rows}: retry after one finishes",
                                   code="rate_limit_exceeded", status=429, kind="requests", retry_after=RETRY_AFTER_S)
            job = Job(req, client)
            self.rows += req.n
            self._client_rows[client] += req.n
            self._jobs.append(job)
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client has gone: drop the job if it waits, end its rows at the next token if it runs."""
        with self._cv:
            job.cancelled = True
            if job in self._jobs:
                self._jobs.remove(job)
            self._release(job)

    def _release(self, job: Job) -> None:  # holding self._cv
        if not job.released:
            job.released = True
            self.rows -= job.req.n
            self._client_rows[job.client] -= job.req.n
            if not self._client_rows[job.client]:
                del self._client_rows[job.client]

    def _finish(self, job: Job, event: tuple) -> None:
        """Free the job's rows, then send its last event: a client that asks again at once finds them free."""
        with self._cv:
            self._release(job)
        job.events.put(event)

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while not self._jobs and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            first = self._jobs.popleft()
            batch, rows = [first], first.req.n
            for job in list(self._jobs):
                if job.batch_key() == first.batch_key() and rows + job.req.n <= self.max_batch_rows:
                    self._jobs.remove(job)
                    batch.append(job)
                    rows += job.req.n
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            try:
                if batch[0].req.recursive is not None:
                    self._run_recursive(batch[0])
                else:
                    self._run_batch(batch)
            except UserError as e:  # e.g. the reasoner refusing a request: the client's mistake
                for job in batch:
                    self._finish(job, ("error", RequestError(str(e))))
            except Exception as e:  # the server keeps serving; the requests in this batch get a 500
                err = RequestError(f"generation failed: {type(e).__name__}: {e}", status=500, kind="server_error")
                for job in batch:
                    self._finish(job, ("error", err))

    def _run_batch(self, batch: list[Job]) -> None:
        first = batch[0].req
        N = first.n
        texts = [[ChoiceText(self.tok, j.req.stop) for _ in range(N)] for j in batch]

        def on_token(row: int, token: int) -> bool:
            i, c = divmod(row, N)
            job = batch[i]
            if job.cancelled:
                return True
            if not (job.req.stream or job.req.stop):  # text is decoded once at the end
                return False
            stopped = texts[i][c].add(token)
            if job.req.stream and (d := texts[i][c].delta()):
                job.events.put(("delta", c, d))
            return stopped

        res = generate_ex(self.model, [j.req.prompt_ids for j in batch], [j.req.max_tokens for j in batch],
                          temperature=first.temperature, top_k=first.top_k, top_p=first.top_p, num_samples=N,
                          stop_ids=self.tok.stop_ids, seed=[j.req.seed for j in batch], pad_id=self.tok.pad_id,
                          on_token=on_token)
        for i, job in enumerate(batch):
            choices = []
            for c in range(N):
                ct = texts[i][c]
                if not (job.req.stream or job.req.stop):
                    ct.text = self.tok.decode(res.tokens[i][c], skip_special=True)
                if job.req.stream and (d := ct.delta(final=True)):
                    job.events.put(("delta", c, d))
                reason = FINISH_STOP if ct.stopped else res.finish_reasons[i][c]
                choices.append({"text": ct.text, "finish_reason": reason})
            usage = {"prompt_tokens": len(job.req.prompt_ids), "completion_tokens": sum(len(t) for t in res.tokens[i])}
            self._finish(job, ("done", {"choices": choices, "usage": usage}))

    def _run_recursive(self, job: Job) -> None:
        r = job.req
        out = self.recursive_fn(r.messages, r.recursive, temperature=r.temperature, max_tokens=r.max_tokens)
        out = {"content": out} if isinstance(out, str) else dict(out)
        text = out["content"]
        for s in r.stop:
            text = text.split(s, 1)[0]
        if r.stream and text:
            job.events.put(("delta", 0, text))
        usage = {"prompt_tokens": int(out.get("prompt_tokens", len(r.prompt_ids))),
                 "completion_tokens": int(out.get("completion_tokens", 0))}
        self._finish(job, ("done", {"choices": [{"text": text, "finish_reason": out.get("finish_reason", FINISH_STOP)}],
                                    "usage": usage, "trace": out.get("trace")}))


# -- HTTP ---------------------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "ChatServer"

    def setup(self):
        self.timeout = self.server.read_timeout  # StreamRequestHandler.setup puts it on the socket
        super().setup()

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    # -- the HTTP layer
    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if not self.path.startswith("/"):  # else a route miss answered keep-alive: clients reading to EOF hang
            self.send_error(HTTPStatus.BAD_REQUEST, f"the request target must start with '/', got {self.path[:80]!r}")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too large, unknown method, ...) as OpenAI-style JSON
        rather than its HTML page. The connection is closed: the rest of the request was not read."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # the line was too broken to give a version: still send a status line
            self.request_version = "HTTP/1.1"
        phrase = HTTPStatus(code).phrase
        text = f"{message or phrase}{f': {explain}' if explain else ''}"
        self.log_error("code %d, message %s", code, text)
        self._send_error(RequestError(text, code=phrase.lower().replace(" ", "_").replace("-", "_"), status=code,
                                      kind="invalid_request_error" if code < 500 else "server_error"))

    # -- plumbing
    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: RequestError) -> None:
        retry = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
        self._send_json(err.status, err.body(), retry)

    def _client_gone(self) -> bool:
        """True when the client has closed its side: the socket reads as EOF (or reset). Bytes it sent ahead (a
        pipelined request) stay unread: MSG_PEEK only looks. A client that half-closes after sending its request
        (shutdown SHUT_WR, which HTTP clients do not do) looks the same and is cancelled too."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:  # reset by the peer
            return True

    def _next_event(self, job: Job) -> tuple:
        """The job's next event; while none comes, a client that has gone raises ConnectionResetError (the caller
        cancels the job), so a queued or running request does not outlive its client."""
        while True:
            try:
                return job.events.get(timeout=POLL_S)
            except queue.Empty:
                if self._client_gone():
                    raise ConnectionResetError("the client closed the connection") from None

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise RequestError("the request needs a Content-Length header (chunked bodies are not accepted)",
                               code="missing_content_length")
        try:
            length = int(length)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError(f"bad Content-Length {length!r}", code="invalid_content_length") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            left = length if length <= DRAIN_BYTES else 0  # drain (without keeping) so the client reads the 400
            while left > 0:
                got = self.rfile.read(min(left, 1 << 16))
                if not got:
                    break
                left -= len(got)
            raise RequestError(f"request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES} bytes",
                               code="request_too_large")
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise RequestError(f"the request body did not arrive within {self.timeout:g} s", code="request_timeout",
                               status=408) from None
        if len(raw) < length:  # the client closed its side early (it may still read the answer)
            self.close_connection = True
            raise RequestError(f"the body ended after {len(raw)} of its {length} bytes (Content-Length)",
                               code="incomplete_body")
        return raw

    # -- routes
    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send_json(200, {"status": "ok", "model": self.server.model_name,
                                  "queue_rows": self.server.engine.rows})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.created,
                 "owned_by": "preflexor"}]})
        elif path == "/v1/chat/completions":
            self._send_error(RequestError("use POST for /v1/chat/completions", code="method_not_allowed", status=405))
        else:
            self._send_error(RequestError(f"no route {self.path}", code="not_found", status=404))

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            raw = self._read_body()
            if path != "/v1/chat/completions":
                raise RequestError(f"no route {self.path}", code="not_found", status=404)
            try:
                body = json.loads(raw.decode("utf-8"))
            except RecursionError:
                raise RequestError("the request body is nested too deeply", code="invalid_json") from None
            except ValueError as e:  # bad UTF-8, bad JSON, an integer of over 4300 digits
                raise RequestError(f"the request body is not valid JSON ({e})", code="invalid_json") from None
            req = self.server.parse(body)
            job = self.server.engine.submit(req, self.client_address[0])
        except RequestError as e:
            self._send_error(e)
            return
        try:
            if req.stream:
                self._stream(job)
            else:
                self._complete(job)
        except (ConnectionError, TimeoutError):  # a failed write, or _next_event finding the client gone
            self.server.engine.cancel(job)  # the worker drops this request's rows at the next token
            self.close_connection = True

    def _complete(self, job: Job) -> None:
        while True:
            kind, *payload = self._next_event(job)
            if kind == "error":
                self._send_error(payload[0])
                return
            if kind == "done":
                break
        out = payload[0]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [{"index": i, "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                    "finish_reason": c["finish_reason"]} for i, c in enumerate(out["choices"])]
        u = out["usage"]
        resp = {"id": rid, "object": "chat.completion", "created": created, "model": self.server.model_name,
                "choices": choices, "usage": {**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}}
        if out.get("trace") is not None:
            resp["preflexor_trace"] = out["trace"]
        self._send_json(200, resp)

    def _stream(self, job: Job) -> None:
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.server.model_name
        kind, *payload = self._next_event(job)
        if kind == "error":  # failed before any token: a plain JSON error
            self._send_error(payload[0])
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(choices: list, usage: dict | None = None) -> None:
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": choices}
            if usage is not None:
                chunk["usage"] = usage
            self._chunk(b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n")

        event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for i in range(job.req.n)])
        while kind == "delta":
            index, text = payload
            event([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
            kind, *payload = self._next_event(job)
        if kind == "error":  # headers are out: report it in-band, as OpenAI does, then end the stream
            self._chunk(b"data: " + json.dumps(payload[0].body()).encode("utf-8") + b"\n\n")
        else:
            out = payload[0]
            event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]}
                   for i, c in enumerate(out["choices"])])
            if job.req.include_usage:
                u = out["usage"]
                event([], {**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]})
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, engine: Engine, model_name: str, max_prompt_tokens: int, max_tokens_limit: int,
                 verbose: bool = False, read_timeout: float = READ_TIMEOUT_S, backlog: int = LISTEN_BACKLOG):
        # set before binding: a failed bind calls server_close (closing the engine); listen() reads the backlog
        self.engine, self.model_name, self.verbose = engine, model_name, verbose
        self.read_timeout, self.request_queue_size = read_timeout, backlog
        try:
            super().__init__(address, Handler)
        except OSError as e:
            raise UserError(f"--serve: cannot listen on {address[0]}:{address[1]} ({e.strerror or e})") from None
        self.max_prompt_tokens, self.max_tokens_limit = max_prompt_tokens, max_tokens_limit
        self.context = engine.model.config.max_position_embeddings
        self.created = int(time.time())

    def parse(self, body) -> ChatRequest:
        req = parse_request(body, self.engine.tok, self.max_prompt_tokens, self.max_tokens_limit, self.context)
        if req.recursive is not None:
            if self.engine.recursive_fn is None:
                raise RequestError("'recursive' needs a server started with a recursive reasoner", param="recursive",
                                   code="unsupported_parameter")
            if req.n != 1:
                raise RequestError("'recursive' supports n=1 only", param="n", code="unsupported_parameter")
        return req

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # the client left while we answered: nobody to tell
            return
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self.engine.close()


def check_limits(**limits: float) -> None:
    """The queue, timeout and backlog limits are positive (a UserError naming the CLI flag otherwise)."""
    for name, v in limits.items():
        if not v > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {v}")


def build_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8000, model_name: str = "preflexor",
                 max_prompt_tokens: int | None = None, max_tokens_limit: int = 1024,
                 recursive_fn: RecursiveFn | None = None, verbose: bool = False,
                 max_queue_rows: int = MAX_QUEUE_ROWS, max_client_rows: int = MAX_CLIENT_ROWS,
                 read_timeout: float = READ_TIMEOUT_S, backlog: int = LISTEN_BACKLOG) -> ChatServer:
    """Bind the server (port 0 picks a free one: see `server.server_address`) and start its model worker; call
    `serve_forever()` to answer requests and `server_close()` to stop. `recursive_fn(messages, rounds,
    temperature=..., max_tokens=...)` answers requests with `recursive: N`; it returns the answer text, or a dict
    with "content" and optionally "prompt_tokens", "completion_tokens", "finish_reason" and a JSON-able "trace"
    (returned as `preflexor_trace`). The queue, timeout and backlog limits are described in the module docstring."""
    check_limits(max_queue_rows=max_queue_rows, max_client_rows=max_client_rows, read_timeout=read_timeout,
                 backlog=backlog)
    context = model.config.max_position_embeddings
    max_prompt_tokens = min(max_prompt_tokens or context - 1, context - 1)
    engine = Engine(model, tokenizer, recursive_fn, max_queue_rows=max_queue_rows, max_client_rows=max_client_rows)
    try:
        return ChatServer((host, port), engine, model_name, max_prompt_tokens, max_tokens_limit, verbose,
                          read_timeout, backlog)
    except BaseException:
        engine.close()
        raise


def serve(model, tokenizer, host: str = "127.0.0.1", port: int = 8000, model_name: str = "preflexor",
          max_prompt_tokens: int | None = None, max_tokens_limit: int = 1024,
          recursive_fn: RecursiveFn | None = None, verbose: bool = False, **limits) -> None:
    """Serve until interrupted (Ctrl-C); `limits` are `build_server`'s max_queue_rows, max_client_rows,
    read_timeout and backlog."""
    server = build_server(model, tokenizer, host, port, model_name, max_prompt_tokens, max_tokens_limit,
                          recursive_fn, verbose, **limits)
    h, p = server.server_address[:2]
    print(f"serving {model_name} on http://{h}:{p}/v1 (chat completions; GET /health)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from preflexor.checkpoint import DEFAULT_MODEL, load_model_and_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF dir, .gguf, or smollm2-135m-instruct")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", default=None, help="id reported by /v1/models (default: --model)")
    ap.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: context)")
    ap.add_argument("--max-queue-rows", type=int, default=MAX_QUEUE_ROWS,
                    help="rows (requests x n) queued or running before new requests get 503")
    ap.add_argument("--max-client-rows", type=int, default=MAX_CLIENT_ROWS,
                    help="rows queued or running from one client IP before its new requests get 429")
    ap.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S,
                    help="seconds one socket read or write may block before the connection is cut")
    ap.add_argument("--backlog", type=int, default=LISTEN_BACKLOG, help="listen backlog (pending connections)")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args(argv)
    limits = dict(max_queue_rows=args.max_queue_rows, max_client_rows=args.max_client_rows,
                  read_timeout=args.read_timeout, backlog=args.backlog)
    check_limits(**limits)  # before the model loads
    model, tok = load_model_and_tokenizer(args.model)
    serve(model, tok, args.host, args.port, args.model_name or args.model, args.max_prompt_tokens,
          args.max_tokens_limit, verbose=args.verbose, **limits)


if __name__ == "__main__":
    main()
