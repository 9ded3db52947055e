"""The fault suite for the command-line tools (issue 20): each bad input ends in one `error:` line naming the file,
line or key, exit code 2 and no traceback, and a file the user owns is left byte-identical. The scripts' `main`
runs in process (the same `exit_on_user_error` wrapper a shell sees); resume and checkpoint faults are in
test_resume_faults.py, the server's in test_server_faults.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import ablations
import infer
import train_orpo
from preflexor import datagen
from preflexor.utils import append_jsonl

PAIR = {"prompt": "What is a cell?", "chosen": "<|thinking|>\nA unit.\n\n<|/thinking|>\nA unit.", "rejected": "No."}


def _line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def fails(capsys, main, argv, needle: str) -> str:
    """Run `main(argv)`; it must exit 2, its stderr ending in one `error:` line that contains `needle` (progress
    lines such as "model: X (given)" may come before it), no traceback."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert e.value.code == 2, err
    assert lines and lines[-1].startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err, err
    assert needle in lines[-1], err
    return lines[-1]


def test_training_config_values_out_of_range(capsys, tmp_path):
    out = tmp_path / "run"
    for override, needle in (("train.batch_size=0", "'train.batch_size' must be >= 1, got 0"),
                             ("train.grad_accum=0", "'train.grad_accum' must be >= 1, got 0"),
                             ("train.lr=-1", "'train.lr' must be > 0, got -1.0"),
                             ("train.iterations=-3", "'train.iterations' must be >= 1, got -3")):
        fails(capsys, train_orpo.main, ["--config", "configs/smoke.yaml", f"train.out_dir={out}", override], needle)
    assert not out.exists()  # nothing written for an invalid command


@pytest.mark.parametrize("bad, needle", [
    (b'{"prompt": "a\\ud800b", "chosen": "x", "rejected": "y"}\n', ":2: a string holds a lone surrogate (U+D800)"),
    (b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}\n', ":2: not UTF-8 (invalid continuation byte at byte 15)"),
    (b"[" * 100_000 + b"\n", ":2: invalid JSON (nested too deeply)"),
    (b'{"prompt": "a", "chosen": "x"}\n', ":2: missing key 'rejected'"),
])
def test_bad_preference_line_is_named(capsys, tmp_path, tiny_llama_dir, bad, needle):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(_line(PAIR) + bad + _line(PAIR))
    before = pairs.read_bytes()
    fails(capsys, train_orpo.main, ["--config", "configs/smoke.yaml", f"model.source={tiny_llama_dir}",
                                    f"data.pairs={pairs}", f"train.out_dir={tmp_path / 'run'}"], f"{pairs}{needle}")
    assert pairs.read_bytes() == before


def test_model_config_with_a_string_size(capsys, tmp_path, tiny_llama_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "hidden_size": "64"}))
    fails(capsys, infer.main, ["--model", model, "Why?"], "hidden_size")


def test_infer_input_lines(capsys, tmp_path):
    inp = tmp_path / "q.jsonl"
    for bad, needle in ((b'{"question": "caf\xe9?"}\n', ":2: not UTF-8"),
                        (b'{"question": "a\\udc00"}\n', ":2: a string holds a lone surrogate (U+DC00)"),
                        (b'{"question": \n', ":2: invalid JSON (Expecting value")):
        inp.write_bytes(b'{"question": "fine"}\n' + bad)
        fails(capsys, infer.main, ["--model", tmp_path / "nope", "--input", inp], f"{inp}{needle}")
    assert not inp.with_suffix(".results.jsonl").exists()


def test_infer_output_not_ours_is_refused_and_torn_row_repaired(capsys, tmp_path):
    inp = tmp_path / "q.jsonl"
    inp.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(3)))
    answer = lambda q: type("R", (), {"to_dict": lambda self: {"answer": q.upper()}})()  # noqa: E731
    # a file of the user's (not rows of ours), with or without its last newline: refused, byte-identical
    for theirs in (b'{"a": 1}\n{"b": 2}\n', b'{"a": 1}', b"some notes"):
        out = tmp_path / "theirs.jsonl"
        out.write_bytes(theirs)
        with pytest.raises(infer.UserError, match=rf"{out}:\d+: not an infer.py results"):
            infer.run_batch(answer, inp, out)
        assert out.read_bytes() == theirs
    # our file with a row torn by a kill: the fragment is cut, the rest resumed, every line one whole row
    out = tmp_path / "ours.jsonl"
    append_jsonl(out, {"line": 1, "question": "q0", "answer": "Q0"})
    with open(out, "ab") as f:
        f.write(b'{"line": 2, "question": "q1", "ans')
    assert infer.run_batch(answer, inp, out) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["line"], r["answer"]) for r in rows] == [(1, "Q0"), (2, "Q1"), (3, "Q2")]
    assert "removed a torn last line" in capsys.readouterr().err


def test_append_never_glues_onto_a_torn_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"step": 1}\n{"step": 2, "lo')
    append_jsonl(p, {"step": 3})
    assert p.read_bytes().splitlines()[-1] == b'{"step": 3}'


def test_datagen_never_rewrites_a_file_it_did_not_write(capsys, tmp_path):
    for theirs in (b'{"a": 1}', b'{"prompt": "p", "chosen": "c", "rejected": "r"}', b'notes\nmore notes',
                   _line(PAIR) + b'{"prompt": "half'):
        out = tmp_path / "mine.json"
        out.write_bytes(theirs)
        fails(capsys, datagen.main, ["--out", out, "--n", "2", "--no-progress", "rejected=teacher_incorrect",
                                     "retrieval=none"], f"{out}:")
        assert out.read_bytes() == theirs
        assert not (tmp_path / "mine_graph").exists()


def test_ablation_cell_names_stay_inside_the_output(capsys, tmp_path):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    for name in ("..", ".", ".hidden", "-x", "a/b", "ok\n"):
        grid = tmp_path / "grid.yaml"
        grid.write_text(json.dumps({"cells": [{"name": name, "kind": "base"}]}))
        fails(capsys, ablations.main, ["--grid", grid, "--out", out, f"--only={name}", "--force"], "cells[0]: name")
    assert (out / "keep.txt").read_text() == "precious"
    assert ablations._NAME.fullmatch("stage2_beta=0.1+int") and ablations._NAME.fullmatch("1")


def test_cli_subprocess_matches_in_process(tmp_path):
    """One real shell run: the exit code and the single line are what the in-process tests check."""
    import subprocess
    import sys

    inp = tmp_path / "q.jsonl"
    inp.write_bytes(b'{"question": "\xff"}\n')
    r = subprocess.run([sys.executable, "infer.py", "--input", str(inp)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert r.returncode == 2 and r.stderr == f"error: {inp}:1: not UTF-8 (invalid start byte at byte 14)\n"
