"""infer.py end to end, as subprocesses on the tiny random Llama: a JSONL batch (20 questions answered, a too-long
one becomes an error row, a rerun resumes), one-line exit-2 errors, the headed output of a recursive run with the
model and critic found from runs/, the interactive prompt with its history file, stdin, and `--serve` with the
request's `recursive` field."""
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from infer import base_model_of, newest_run_model, read_questions
from preflexor.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def infer(*args, cwd=ROOT, env=None, input=None, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *map(str, args)], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, input=input, timeout=timeout)


def test_jsonl_batch_of_20_with_a_failing_question(tiny_llama_dir, tmp_path):
    questions = [{"question": f"What is material number {i} made of?"} for i in range(20)]
    questions.insert(7, {"prompt": "word " * 700})  # > the tiny model's 512-token context
    inp, out = tmp_path / "q.jsonl", tmp_path / "out" / "r.jsonl"
    inp.write_text("\n".join(json.dumps(q) for q in questions) + "\n\n")  # a trailing blank line is fine
    r = infer("--model", tiny_llama_dir, "--input", inp, "--output", out, "--recursive", 2, "max_new_tokens=6")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 21 and [row["line"] for row in rows] == list(range(1, 22))
    errors = [row for row in rows if "error" in row]
    assert len(errors) == 1 and errors[0]["line"] == 8 and set(errors[0]) == {"line", "question", "error"}
    assert "does not fit the model's context of 512" in errors[0]["error"]
    ok = [row for row in rows if "error" not in row]
    assert len(ok) == 20 and [row["question"] for row in ok] == [q["question"] for q in questions if "question" in q]
    for row in ok:  # thinking variant, N=2: 1 + 3 + 1 calls (no integration call when no answer is non-empty)
        skipped = any("skipped the integration call" in json.dumps(i) for i in row["issues"])
        assert row["n_calls"] == 5 - skipped and len(row["rounds"]) == 2 and isinstance(row["final_answer"], str)
        assert all(c["completion_tokens"] <= 6 for c in row["calls"])
    assert "(1 error(s))" in r.stderr
    # a rerun resumes: nothing is answered twice
    r = infer("--model", tiny_llama_dir, "--input", inp, "--output", out, "--recursive", 2, "max_new_tokens=6")
    assert r.returncode == 0 and "resuming: 21 of 21" in r.stderr
    assert len(out.read_text().splitlines()) == 21


def test_user_errors_exit_2_with_one_line(tmp_path):
    r = infer("--model", tmp_path / "nope", "Why?")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "nope: model not found" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine"}\n{"question": \n')
    r = infer("--model", tmp_path / "nope", "--input", bad, "--output", tmp_path / "o.jsonl")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {bad}:2: invalid JSON (Expecting value at column 14)"
    assert not (tmp_path / "o.jsonl").exists()
    bad.write_text('{"text": "no question key"}\n')
    r = infer("--input", bad)
    assert r.returncode == 2 and f"{bad}:1: expected an object" in r.stderr
    for bad_value, needle in (("recursive=-1", "config key 'recursive' must be >= 0, got -1"),
                              ("--max-new-tokens=-4", "config key 'max_new_tokens' must be >= 1, got -4"),
                              ("--port=99999", "config key 'port' must be in [0, 65535], got 99999")):
        r = infer("--model", tmp_path, "Why?", bad_value)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_serve_on_a_port_in_use_is_one_line(tiny_llama_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = infer("--model", tiny_llama_dir, "--serve", "--port", port)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith(f"error: --serve: cannot listen on 127.0.0.1:{port}"), r.stderr


def make_runs(root: Path, tiny: Path) -> Path:
    """runs/stage{1,2}/final/model as the training scripts lay them out (links to the tiny model); stage 2 trained
    from stage 1, stage 1 from a base model dir (another link to the tiny model)."""
    base = root / "base_model"
    base.symlink_to(tiny)
    for stage, source in (("stage1", str(base)), ("stage2", str(root / "runs" / "stage1" / "final" / "model"))):
        run = root / "runs" / stage
        (run / "final").mkdir(parents=True)
        (run / "final" / "model").symlink_to(tiny)
        (run / "config.json").write_text(json.dumps({"model": {"source": source}, "train": {}}))
    return base


def test_model_and_critic_discovery(tiny_llama_dir, tmp_path):
    assert newest_run_model(tmp_path / "runs") == (None, f"no trained run in {tmp_path / 'runs'}/")
    base = make_runs(tmp_path, tiny_llama_dir)
    path, why = newest_run_model(tmp_path / "runs")
    assert path == str(tmp_path / "runs" / "stage2" / "final" / "model") and why.startswith("newest stage2 run")
    newer = tmp_path / "runs" / "stage2_dpo"
    (newer / "final" / "model").mkdir(parents=True)
    (newer / "final" / "model" / "config.json").write_text("{}")
    os.utime(newer / "final" / "model", (time.time() + 100, time.time() + 100))
    assert newest_run_model(tmp_path / "runs")[0] == str(newer / "final" / "model")
    # the critic is the model the chain of runs started from, not stage 1
    assert base_model_of(str(tmp_path / "runs" / "stage2" / "final" / "model")) == str(base)
    assert base_model_of(str(tmp_path / "runs" / "stage1" / "final" / "model")) == str(base)
    assert base_model_of(str(tiny_llama_dir)) is None


def test_recursive_run_prints_headed_rounds(tiny_llama_dir, tmp_path):
    make_runs(tmp_path, tiny_llama_dir)
    r = infer("What makes nacre tough?", "--recursive", 2, "max_new_tokens=5", "temperature=1.0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"model: runs/stage2/final/model (newest stage2 run in runs/)" in r.stderr
    assert f"critic: {tmp_path / 'base_model'} (base model of the run)" in r.stderr
    heads = re.findall(r"^── (.+) ──$", r.stdout, flags=re.M)
    assert heads == ["round 0 · thinking", "round 0 · answer", "round 1 · critique", "round 1 · improved thinking",
                     "round 1 · answer", "integrated answer"]
    assert "5 model call(s)" in r.stderr


def test_graph_critic_runs_the_recursion_offline(tiny_llama_dir):
    """`--critic graph`: the critic is the knowledge graph of the corpus (no second model is loaded); its critique
    and the integration are in the rounds."""
    r = infer("--model", tiny_llama_dir, "--critic", "graph", "--recursive", 2, "--json", "max_new_tokens=6",
              "Is enamel a kind of tissue?")
    assert r.returncode == 0, r.stderr
    assert "critic: the knowledge graph of corpus 'ontology' (offline, grounded)" in r.stderr
    row = json.loads(r.stdout)
    critique = row["rounds"][1]["feedback"]
    assert critique.startswith(("False steps:", "Every stated is-a relation is true")), critique
    assert [c["role"] for c in row["calls"]] == ["reasoner", "critic", "critic", "reasoner", "critic"]  # + integration
    r = infer("--model", tiny_llama_dir, "--critic", "graph:/no/such/corpus", "--recursive", 1, "x")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and "/no/such/corpus" in last, r.stderr


def test_plain_question_from_stdin_as_json(tiny_llama_dir):
    r = infer("--model", tiny_llama_dir, "--json", "max_new_tokens=4", input="What is silk?\n")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["n_calls"] == 1 and row["question"] == "What is silk?" and row["calls"][0]["completion_tokens"] <= 4
    assert "critic:" not in r.stderr and "critic" not in r.stdout  # a plain answer loads and mentions no critic
    assert row["rounds"][0]["thinking"] is None and row["final_answer"] == row["rounds"][0]["answer"]


def _read_until(fd: int, marker: str, timeout: float = 120.0) -> str:
    import codecs

    dec, buf, deadline = codecs.getincrementaldecoder("utf-8")("replace"), "", time.time() + timeout
    while marker not in buf and time.time() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += dec.decode(chunk)
    return buf


def test_interactive_prompt_keeps_history(tiny_llama_dir, tmp_path):
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "infer.py"), "--model", str(tiny_llama_dir),
                             "max_new_tokens=4"], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                            env={**ENV, "HOME": str(tmp_path)})
    os.close(slave)
    try:
        assert "\n> " in _read_until(master, "\n> ")
        os.write(master, b"What is silk?\n")
        out = _read_until(master, "\n> ")
        assert "── thinking ──" in out and "── answer ──" in out and "1 model call(s)" in out
        os.write(master, b"exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    assert "What is silk?" in (tmp_path / ".preflexor_history").read_text()


def test_serve_answers_plain_and_recursive_requests(tiny_llama_dir):
    proc = subprocess.Popen([sys.executable, str(ROOT / "infer.py"), "--serve", "--model", str(tiny_llama_dir),
                             "--port", "0"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        url, seen = None, []
        for line in proc.stderr:
            seen.append(line)
            if m := re.search(r"on (http://[\d.]+:\d+/v1)", line):
                url = m.group(1)
                break
        assert url, "".join(seen)
        threading.Thread(target=proc.stderr.read, daemon=True).start()

        def post(body):
            req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())

        msgs = [{"role": "user", "content": "What is silk?"}]
        plain = post({"messages": msgs, "max_tokens": 4, "temperature": 0})
        assert "preflexor_trace" not in plain and plain["usage"]["completion_tokens"] <= 4
        out = post({"messages": msgs, "max_tokens": 4, "temperature": 0, "recursive": 2})
        trace = out["preflexor_trace"]
        assert trace["n_calls"] == 5 and trace["question"] == "What is silk?"
        assert out["choices"][0]["message"]["content"] == trace["final_answer"]
        assert out["usage"]["completion_tokens"] == trace["completion_tokens"] <= 5 * 4
        assert all(c["completion_tokens"] <= 4 for c in trace["calls"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_read_questions_accepts_question_or_prompt(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "a"}\n\n{"prompt": "b Use <|thinking|>."}\n')
    assert read_questions(f) == [(1, "a"), (3, "b Use <|thinking|>.")]
    with pytest.raises(UserError, match="input file not found"):
        read_questions(tmp_path / "missing.jsonl")
