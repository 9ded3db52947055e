"""Recursive reasoning (preflexor.md §5): the round structure and call counts of both variants, that the critic's
improved thinking is what the reasoner re-answers from (scripted generators that record every prompt, and the real
SmolLM2 whose greedy answer changes with the injected block), robust extraction, and generators on real models."""
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from preflexor.errors import UserError
from preflexor.reasoning import (CRITIQUE_PROMPT, INTEGRATE_PROMPT, NO_REFLECTION_FEEDBACK, SYSTEM_CRITIC,
                                 GenerationOut, HTTPGenerator, ModelGenerator, clean_critic_thinking, expected_calls,
                                 recursive_reflection, recursive_thinking)
from preflexor.thinking import thinking_prefix

ROOT = Path(__file__).resolve().parent.parent
TS, TE, RS, RE = "<|thinking|>", "<|/thinking|>", "<|reflect|>", "<|/reflect|>"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Short generations on small models: one intra-op thread is faster, and much faster on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Scripted:
    """A generator whose replies come from a function of (call number, messages, prefix); it records every call
    into a log shared with the other generators, so the order of calls across reasoner and critic is visible."""

    def __init__(self, name, reply, log):
        self.name, self.reply, self.log = name, reply, log

    def chat(self, messages, temperature=0.1, max_tokens=512, assistant_prefix=""):
        self.log.append({"who": self.name, "messages": messages, "prefix": assistant_prefix,
                         "max_tokens": max_tokens})
        n = sum(c["who"] == self.name for c in self.log)
        return GenerationOut(self.reply(n, messages, assistant_prefix), 11, 3, 0.001, "stop")


def thinking_pair(log):
    reasoner = Scripted("reasoner", lambda n, m, p: f"{TS}\nfirst thoughts\n{TE}\nanswer A" if not p
                        else f"\nanswer {n}", log)
    critic = Scripted("critic", lambda n, m, p: f"critic says {n}", log)
    return reasoner, critic


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("integrate", [True, False])
def test_thinking_variant_round_structure(n, integrate):
    log = []
    res = recursive_thinking("Why is nacre tough?", *thinking_pair(log), n_rounds=n, integrate=integrate)
    assert res.n_calls == len(log) == 1 + 3 * (n - 1) + int(integrate) == expected_calls("thinking", n, integrate)
    steps = [(c.role, c.step) for c in res.calls]
    body = [("critic", "critique"), ("critic", "improve"), ("reasoner", "reanswer")] * (n - 1)
    assert steps == [("reasoner", "answer"), *body] + ([("critic", "integrate")] if integrate else [])
    assert len(res.rounds) == n and res.answers[0] == "answer A"
    assert res.thinking_versions[0] == "first thoughts"
    assert res.issues == []
    assert res.final_answer == (res.integrated_answer if integrate else res.answers[-1])
    d = res.to_dict()
    assert d["n_calls"] == res.n_calls and d["prompt_tokens"] == 11 * res.n_calls and d["completion_tokens"] == 3 * res.n_calls


def test_thinking_variant_prompts_chain_correctly():
    """Round i: the critique sees the current thinking, the rewrite sees that critique, the reasoner gets the
    rewrite injected as a complete thinking block in an otherwise identical prompt, and the integration sees all
    answers."""
    log = []
    res = recursive_thinking("Why is nacre tough?", *thinking_pair(log), n_rounds=3)
    first_msgs = log[0]["messages"]
    assert first_msgs[-1]["content"] == "Why is nacre tough? Use <|thinking|>." and log[0]["prefix"] == ""
    thinking = "first thoughts"
    for r in range(1, 3):
        critique, improve, reanswer = log[3 * r - 2: 3 * r + 1]
        assert thinking in critique["messages"][-1]["content"] and "Why is nacre tough?" in critique["messages"][-1]["content"]
        critique_text = f"critic says {2 * r - 1}"
        assert critique_text in improve["messages"][-1]["content"] and thinking in improve["messages"][-1]["content"]
        thinking = f"critic says {2 * r}"
        assert reanswer["who"] == "reasoner" and reanswer["messages"] == first_msgs
        assert reanswer["prefix"] == thinking_prefix(thinking) == f"{TS}\n{thinking}\n\n{TE}"
        assert res.rounds[r].thinking == thinking and res.rounds[r].feedback == critique_text
        assert res.rounds[r].response == reanswer["prefix"] + f"\nanswer {r + 1}"
    integ = log[-1]["messages"][-1]["content"]
    assert all(a in integ for a in ["answer A", "answer 2", "answer 3"]) and "Candidate answer 3" in integ
    assert INTEGRATE_PROMPT.split("{")[0] in integ
    assert res.integrated_answer == "critic says 5" == res.final_answer


@pytest.mark.parametrize("n", [1, 2])
def test_reflection_variant_uses_the_models_reflection(n):
    log = []
    reasoner = Scripted("reasoner", lambda k, m, p: f"{TS}t0{TE}{RS}reflection 1{RE} reply-1" if not p
                        else f"{RS}reflection {k}{RE} reply-{k}", log)
    critic = Scripted("critic", lambda k, m, p: f"better thinking {k}", log)
    res = recursive_reflection("Q?", reasoner, critic, n_rounds=n)
    assert res.n_calls == 1 + 2 * n + 1 == expected_calls("reflection", n)
    assert [c.step for c in res.calls] == ["answer"] + ["improve", "reanswer"] * n + ["integrate"]
    for i in range(1, n + 1):
        improve, reanswer = log[2 * i - 1], log[2 * i]
        assert f"reflection {i}" in improve["messages"][-1]["content"]  # the previous reflection is the feedback
        assert reanswer["prefix"] == thinking_prefix(f"better thinking {i}")
        assert res.rounds[i].reflection == f"reflection {i + 1}" and res.rounds[i].answer == f"reply-{i + 1}"
    assert not res.rounds[0].integrated  # as in the reference, the first answer is not integrated
    integ = log[-1]["messages"][-1]["content"]
    assert "reply-1" not in integ and all(f"reply-{i + 1}" in integ for i in range(1, n + 1))
    assert res.issues == []


def test_reflection_variant_without_reflection_reports_and_goes_on():
    log = []
    reasoner = Scripted("reasoner", lambda k, m, p: f"{TS}t0{TE} plain answer" if not p else " again", log)
    critic = Scripted("critic", lambda k, m, p: "rewritten", log)
    res = recursive_reflection("Q?", reasoner, critic, n_rounds=1)
    assert res.n_calls == 4
    assert NO_REFLECTION_FEEDBACK in log[1]["messages"][-1]["content"]
    assert any("no <|reflect|> block" in i["issue"] for i in res.issues)
    assert any(i["step"] == "improve" and "no reflection" in i["issue"] for i in res.issues)


def test_broken_outputs_never_crash_and_are_reported():
    """Reasoner: an unclosed thinking block, then an empty continuation; critic: empty everything."""
    log = []
    reasoner = Scripted("reasoner", lambda k, m, p: f"{TS} thoughts that never close" if not p else "", log)
    critic = Scripted("critic", lambda k, m, p: "", log)
    res = recursive_thinking("Q?", reasoner, critic, n_rounds=2)
    assert res.n_calls == 4  # nothing to integrate: the integration call is skipped, and that is reported
    issues = [(i["round"], i["step"], i["issue"]) for i in res.issues]
    assert (0, "answer", "unclosed <|thinking|>") in issues
    assert (0, "answer", "response ended inside a block; no answer") in issues
    assert (1, "critique", "critic returned an empty critique") in issues
    assert (1, "improve", "critic returned an empty rewrite; kept the previous thinking") in issues
    assert (1, "reanswer", "empty answer") in issues
    assert res.rounds[1].thinking == "thoughts that never close"  # kept, and injected again
    assert log[3]["prefix"] == thinking_prefix("thoughts that never close")
    assert (2, "integrate", "no non-empty answer to integrate; skipped the integration call") in issues
    assert res.final_answer == "" and res.integrated_answer is None


def test_empty_answers_are_left_out_of_the_integration():
    log = []
    reasoner = Scripted("reasoner", lambda k, m, p: f"{TS}t{TE} first answer" if not p else "", log)
    critic = Scripted("critic", lambda k, m, p: "" if k == 3 else f"c{k}", log)  # empty integration
    res = recursive_thinking("Q?", reasoner, critic, n_rounds=2)
    assert res.n_calls == 5 and "Candidate answer 2" not in log[-1]["messages"][-1]["content"]
    assert {"round": 2, "step": "integrate", "issue": "1 empty answer(s) left out of the integration"} in res.issues
    assert res.integrated_answer == "" and res.final_answer == "first answer"  # the last non-empty answer


def test_response_without_thinking_gives_whole_text_to_the_critic():
    log = []
    reasoner = Scripted("reasoner", lambda k, m, p: "just an answer" if not p else "second", log)
    critic = Scripted("critic", lambda k, m, p: f"{TS}wrapped rewrite{TE}", log)
    res = recursive_thinking("Q?", reasoner, critic, n_rounds=2, integrate=False)
    assert res.rounds[0].answer == "just an answer" and res.rounds[0].thinking == "just an answer"
    assert "just an answer" in log[1]["messages"][-1]["content"]
    assert log[3]["prefix"] == thinking_prefix("wrapped rewrite")  # critic's tags removed before injection
    assert any("critic wrote thinking tags" in i["issue"] for i in res.issues)
    assert res.final_answer == "second"


def test_plain_answer_needs_no_critic_and_trigger_is_added_once():
    log = []
    reasoner, _ = thinking_pair(log)
    res = recursive_thinking("Q? Use <|thinking|>.", reasoner, None, n_rounds=1, integrate=False)
    assert res.n_calls == 1 and log[0]["messages"][-1]["content"] == "Q? Use <|thinking|>."
    with pytest.raises(UserError):
        recursive_thinking("Q?", reasoner, None, n_rounds=2)


def test_open_thinking_prefills_the_tag():
    log = []
    reasoner = Scripted("reasoner", lambda k, m, p: f"pre-opened{TE} ans", log)
    res = recursive_thinking("Q?", reasoner, None, n_rounds=1, integrate=False, open_thinking=True)
    assert log[0]["prefix"] == TS and res.rounds[0].thinking == "pre-opened" and res.issues == []


# -- the critic's rewrite (the parsers themselves: test_thinking.py) ----------------------------------------------

def test_critic_cleaning():
    assert clean_critic_thinking(" plain rewrite ") == ("plain rewrite", None)
    assert clean_critic_thinking(f"Sure! {TS}inner{TE} hope it helps") == ("inner", "critic wrote thinking tags; used their content")
    assert clean_critic_thinking(f"text {RS}") == ("text", "critic wrote reasoning tags; removed them")


# -- real models ------------------------------------------------------------------------------------------------

def skipped_integration(res) -> int:
    """1 when the run reported that it had no non-empty answer to integrate (a real model may answer nothing)."""
    return int(any("skipped the integration call" in i["issue"] for i in res.issues))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from preflexor.checkpoint import load_model_and_tokenizer
    return load_model_and_tokenizer(tiny_llama_dir)


def test_model_generator_injects_prefix_as_reasoning_ids(tiny):
    model, tok = tiny
    gen = ModelGenerator(model, tok, seed=3)
    msgs = [{"role": "user", "content": "Q? Use <|thinking|>."}]
    base = gen.prompt_ids(msgs)
    ids = gen.prompt_ids(msgs, thinking_prefix("some thoughts"))
    assert ids[:len(base)] == base and base == tok.encode_chat(msgs, allow_special=True)
    tail = ids[len(base):]
    assert tail[0] == tok.think_start_id and tail[-1] == tok.think_end_id and tok.think_start_id in base
    out = gen.chat(msgs, temperature=0.0, max_tokens=5, assistant_prefix=thinking_prefix("some thoughts"))
    assert out.prompt_tokens == len(ids) and out.completion_tokens <= 5 and out.seconds > 0
    # the same greedy call on the raw sampler gives the same text: the prefix is only more prompt
    from preflexor.sampler import generate
    ref = generate(model, [ids], 5, temperature=0.0, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0][0]
    assert out.text == tok.decode(ref, skip_special=True)


def test_model_generator_context_limits(tiny):
    model, tok = tiny
    gen = ModelGenerator(model, tok)
    ctx = model.config.max_position_embeddings  # 512
    long_q = [{"role": "user", "content": "word " * (ctx + 10)}]
    with pytest.raises(UserError, match="does not fit the model's context of 512"):
        gen.chat(long_q, max_tokens=4)
    n = len(gen.prompt_ids([{"role": "user", "content": "word " * (ctx - 40)}]))
    fits = [{"role": "user", "content": "word " * (ctx - 40)}]
    out = gen.chat(fits, temperature=0.0, max_tokens=1000)  # clipped to the room left, not an error
    assert out.completion_tokens <= ctx - n


def test_tiny_model_full_runs_count_calls(tiny):
    """Both variants end to end on a real (random) model through the sampler, counting the calls made."""
    model, tok = tiny
    calls = []

    class Counting(ModelGenerator):
        def chat(self, *a, **kw):
            calls.append(self.name)
            return super().chat(*a, **kw)

    reasoner = Counting(model, tok, seed=1, name="reasoner")
    critic = Counting(model, tok, seed=2, name="critic")
    for n in (2, 3):
        calls.clear()
        res = recursive_thinking("What makes silk tough?", reasoner, critic, n_rounds=n, max_new_tokens=8,
                                 temperature=1.0)
        assert len(calls) == res.n_calls == 1 + 3 * (n - 1) + 1
        assert calls.count("reasoner") == n and all(c.completion_tokens <= 8 for c in res.calls)
        assert len(res.rounds) == n and isinstance(res.final_answer, str)
    calls.clear()
    res = recursive_reflection("What makes silk tough?", reasoner, critic, n_rounds=2, max_new_tokens=8)
    assert len(calls) == res.n_calls == expected_calls("reflection", 2) - skipped_integration(res)
    assert len(res.issues) > 0  # a random model writes no tags: reported, not raised


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from preflexor.checkpoint import load_model_and_tokenizer
    return load_model_and_tokenizer(smollm2_dir)


def test_injected_thinking_conditions_the_greedy_answer(smollm2):
    """On the real SmolLM2: the same question re-answered with two different injected thinking blocks gives two
    different greedy continuations, and the same block twice gives the same one."""
    model, tok = smollm2
    gen = ModelGenerator(model, tok)
    msgs = [{"role": "user", "content": "Which material is this about? Use <|thinking|>."}]
    outs = [gen.chat(msgs, temperature=0.0, max_tokens=6, assistant_prefix=thinking_prefix(t)).text
            for t in ("The material is spider silk.", "The material is concrete.", "The material is spider silk.")]
    assert outs[0] != outs[1] and outs[0] == outs[2]
    assert "silk" in outs[0]


def test_smollm2_recursive_round_structure(smollm2):
    """The thinking variant (N=2) and the reflection variant (N=1) on the embedded default, short generations."""
    model, tok = smollm2
    reasoner, critic = ModelGenerator(model, tok, name="reasoner"), ModelGenerator(model, tok, seed=7, name="critic")
    res = recursive_thinking("What makes silk tough?", reasoner, critic, n_rounds=2, max_new_tokens=6)
    assert [c.step for c in res.calls] == ["answer", "critique", "improve", "reanswer", "integrate"]
    assert all(c.completion_tokens <= 6 and c.prompt_tokens > 20 for c in res.calls)
    assert res.rounds[1].response.startswith(thinking_prefix(res.rounds[1].thinking))
    res = recursive_reflection("What makes silk tough?", reasoner, critic, n_rounds=1, max_new_tokens=6)
    roles = ["reasoner", "critic", "reasoner", "critic"][:expected_calls("reflection", 1) - skipped_integration(res)]
    assert [c.role for c in res.calls] == roles


# -- over HTTP ----------------------------------------------------------------------------------------------------

def start_server(cmd: list[str], timeout: float = 180.0):
    """Start a server subprocess that prints "serving ... on http://HOST:PORT/v1" to stderr (port 0 = any free
    one); return (process, base url)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"on (http://[\d.]+:\d+/v1)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, m.group(1)
    proc.kill()
    raise AssertionError(f"server did not start: {''.join(seen)[-2000:]}")


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir):
    proc, url = start_server([sys.executable, "-m", "preflexor.server", "--model", "smollm2-135m-instruct",
                              "--port", "0"])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_critic_over_http_at_our_server(smollm2, smollm2_server):
    """The critic is SmolLM2 served by `python -m preflexor.server`; the reasoner is the same model in process."""
    model, tok = smollm2
    critic = HTTPGenerator(smollm2_server, name="critic")
    res = recursive_thinking("What makes silk tough?", ModelGenerator(model, tok), critic, n_rounds=2,
                             max_new_tokens=6, temperature=0.0, critic_temperature=0.0)
    assert [(c.role, c.step) for c in res.calls] == [("reasoner", "answer"), ("critic", "critique"),
                                                     ("critic", "improve"), ("reasoner", "reanswer"),
                                                     ("critic", "integrate")]
    for c in res.calls:  # token counts come back from the server's usage
        assert c.prompt_tokens > 20 and 0 < c.completion_tokens <= 6
    # greedy: the HTTP critic's critique equals the same prompt run in process
    local = ModelGenerator(model, tok).chat(
        [{"role": "system", "content": SYSTEM_CRITIC},
         {"role": "user", "content": CRITIQUE_PROMPT.format(question="What makes silk tough?",
                                                            thinking=res.rounds[0].thinking)}],
        temperature=0.0, max_tokens=6)
    assert res.rounds[1].feedback == local.text.strip()


def test_http_prefix_continues_the_assistant_turn(smollm2, smollm2_server):
    """An injected thinking block sent over HTTP (continue_final_message) gives exactly the in-process greedy
    continuation."""
    model, tok = smollm2
    msgs = [{"role": "user", "content": "Which material is this about? Use <|thinking|>."}]
    prefix = thinking_prefix("The material is spider silk.")
    remote = HTTPGenerator(smollm2_server).chat(msgs, temperature=0.0, max_tokens=6, assistant_prefix=prefix)
    local = ModelGenerator(model, tok).chat(msgs, temperature=0.0, max_tokens=6, assistant_prefix=prefix)
    assert remote.text == local.text and remote.prompt_tokens == local.prompt_tokens
    assert remote.finish_reason == "length"


class Recorder:
    """A stdlib OpenAI-style endpoint that records request bodies and answers "ok"."""

    def __init__(self):
        self.bodies = []
        rec = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                rec.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                out = json.dumps({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_http_prefix_modes_request_bodies():
    rec = Recorder()
    try:
        msgs = [{"role": "user", "content": "Q? Use <|thinking|>."}]
        out = HTTPGenerator(rec.url).chat(msgs, 0.0, 5, assistant_prefix="<|thinking|>\nT\n<|/thinking|>")
        body = rec.bodies[-1]
        assert body["messages"][-1] == {"role": "assistant", "content": "<|thinking|>\nT\n<|/thinking|>"}
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert out.text == "ok" and out.prompt_tokens is None  # no usage in the reply: unknown, not 0
        HTTPGenerator(rec.url, prefix_mode="fold").chat(msgs, 0.0, 5, assistant_prefix="<|thinking|>\nT\n<|/thinking|>")
        body = rec.bodies[-1]
        assert len(body["messages"]) == 1 and "continue_final_message" not in body
        assert body["messages"][0]["content"].startswith("Q? Use <|thinking|>.") and body["messages"][0]["content"].endswith("T\n<|/thinking|>")
        HTTPGenerator(rec.url).chat(msgs, 0.0, 5)
        assert "continue_final_message" not in rec.bodies[-1] and msgs == [{"role": "user", "content": "Q? Use <|thinking|>."}]
    finally:
        rec.server.shutdown()
