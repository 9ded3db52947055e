"""OpenAI-compatible `/v1/chat/completions` over stdlib urllib (no client library at run time): the one HTTP client of
the teacher, the reasoning generator and the judge. Connection errors, timeouts, HTTP 429 and 5xx are retried
`max_retries` times with exponential backoff (backoff * 2**attempt seconds, honouring Retry-After up to 30 s); other
HTTP errors and the final failure raise one `UserError`. At most `max_concurrency` requests are in flight at once across
all threads. The key in `api_key_env` is read per call; without one no Authorization header is sent (local servers).
"""
from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from preflexor.errors import UserError


@dataclass
class Completion:
    """One reply: the message text, the response's `usage` ({} when the endpoint reports none) and why it stopped."""

    text: str
    usage: dict
    finish_reason: str | None


class ChatClient:
    """Chat completions against one endpoint (`base_url` with or without `/v1`, or the full endpoint URL)."""

    def __init__(self, base_url: str, model: str = "default", api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 0.5, max_concurrency: int = 4):
        url = base_url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise UserError(f"endpoint url {base_url!r} must start with http:// or https://")
        if not url.endswith("/chat/completions"):
            url = url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")
        self.url, self.model, self.api_key_env = url, model, api_key_env
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.max_concurrency = max(1, int(max_concurrency))
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self.retries = 0  # retried requests so far (for logs and tests)

    def complete(self, messages: list[dict], temperature: float = 0.2, max_tokens: int = 1024,
                 extra: dict | None = None) -> Completion:
        """One chat completion; `extra` adds body fields (e.g. vLLM's `continue_final_message`)."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens, **(extra or {})}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2 ** attempt
            try:
                with self._slots, urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    out = json.loads(resp.read().decode("utf-8"))
                try:
                    choice = out["choices"][0]
                    content = choice["message"]["content"]
                except (KeyError, IndexError, TypeError):
                    raise UserError(f"endpoint {self.url}: response without choices[0].message.content: "
                                    f"{json.dumps(out)[:200]}") from None
                usage = out.get("usage") if isinstance(out.get("usage"), dict) else {}
                return Completion(content or "", usage, choice.get("finish_reason"))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:200] if e.fp is not None else ""
                if e.code != 429 and e.code < 500:
                    raise UserError(f"endpoint {self.url}: HTTP {e.code} {e.reason}: {detail}") from None
                last = f"HTTP {e.code} {e.reason}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = min(float(retry_after), 30.0)
            except (urllib.error.URLError, http.client.HTTPException, OSError, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.max_retries:
                self.retries += 1
                time.sleep(wait)
        raise UserError(f"endpoint {self.url} failed after {self.max_retries + 1} attempts ({last})")
