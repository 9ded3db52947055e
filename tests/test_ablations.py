"""The ablation runner: grid parsing and its errors, a 2-cell micro grid run for real (cells run, a finished cell is
skipped on rerun, the report regenerates), the recursion sweep against a direct `recursive_thinking` call, and the
cost bookkeeping (phases from file times, the linear full-grid estimate)."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from ablations import ROOT, estimate_cost, load_grid, main, recursion_sweep, run_dir, seed_overrides, training_phases
from preflexor.errors import UserError

THINK = "<|thinking|>\n**Reasoning Steps**:\n\n{a} relates to {b}.\n\n<|/thinking|>\n{A} is a kind of {b}."


def write_pairs(path: Path, n: int = 6) -> Path:
    words = ["bone", "collagen", "enamel", "keratin", "tendon", "cartilage", "dentin"]
    lines = []
    for i in range(n):
        a, b = words[i % 7], words[(i + 2) % 7]
        lines.append(json.dumps({"prompt": f"What is {a}, and how does it relate to {b}? Use <|thinking|>.",
                                 "chosen": THINK.format(a=a, b=b, A=a.capitalize()),
                                 "rejected": f"{a.capitalize()} is unrelated to {b}.",
                                 "meta": {"index": i, "question": f"What is {a}, and how does it relate to {b}?",
                                          "answer": f"{a.capitalize()} is a kind of {b}."}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_grid(tmp_path: Path, model: Path, pairs: Path, cells: str, extra: str = "") -> Path:
    tiny = (f"[model.source={model}, data.pairs={pairs}, data.heldout_pairs=2, train.iterations=1, "
            "train.steps_per_iteration=2, train.batch_size=1, train.grad_accum=1, train.eval_generations=0, lora.r=4, "
            "lora.alpha=8, data.max_length=96, data.max_prompt_len=48]")
    g = tmp_path / "micro.yaml"
    g.write_text(f"""name: micro
threads: 1
base_model: {model}
stage1: {{config: configs/stage1_grounded.yaml, overrides: {tiny}}}
eval: {{n_questions: 2, max_new_tokens: 4, eval_set: {{file: {pairs}}}}}
{extra}
cells:
{cells}
""")
    return g


def test_grid_files_parse_and_bad_grids_name_the_file(tmp_path):
    grounded = load_grid(ROOT / "configs/ablations/grounded.yaml")
    grounded_full = load_grid(ROOT / "configs/ablations/grounded_full.yaml")
    for g in (grounded, grounded_full):
        kinds = {c.kind for c in g.cells}
        assert kinds == {"base", "stage1", "stage2", "recursion"}
        rec = [c for c in g.cells if c.kind == "recursion"]
        assert sorted((c.depth, c.integrate) for c in rec) == [(d, i) for d in (1, 2, 3) for i in (False, True)]
        assert all(g.cell(c.source).kind == "stage1" for c in g.cells if c.kind == "stage2")
    # the full grounded grid covers every value of every knob
    ov = " ".join(o for c in grounded_full.cells for o in c.overrides)
    for v in ("loss.mask=random_fraction", "loss.mask_fraction=0.2", "loss.mask=none", "loss.name=sigmoid",
              "loss.name=ipo", "data.rejected_source=teacher_incorrect", "data.retrieval=dense",
              "data.retrieval=hybrid", "data.retrieval=none"):
        assert v in ov, v
    assert all(len(c.seeds) == 3 for c in grounded_full.cells if c.kind != "base") and not grounded_full.share_stage1
    # the reasoning grids: one knob per stage-2 cell against the default, seed by seed, on the 200 fixed questions
    reduced, full = load_grid(ROOT / "configs/ablations/reduced.yaml"), load_grid(ROOT / "configs/ablations/full.yaml")
    for g in (reduced, full):
        assert g.eval["kind"] == "reasoning" and g.eval["n_questions"] >= 200
        assert {c.kind for c in g.cells} == {"base", "stage1", "stage2"}
        knobs = [c for c in g.cells if c.kind == "stage2" and c.name != "stage1+2"]
        assert knobs and all(c.vs == "stage1+2" and len(c.seeds) >= 3 for c in knobs)
        ov = " ".join(o for c in knobs for o in c.overrides)
        for v in ("loss.mask=random_fraction", "loss.mask_fraction=0.2", "loss.mask=none", "loss.name=sigmoid",
                  "loss.name=ipo", "data.rejected_source=teacher_incorrect", "data.retrieval=none",
                  "data.refresh=false"):
            assert v in ov, v
    assert reduced.share_stage1 and [c.seeds for c in reduced.cells if c.kind == "stage1"] == [[0]]
    assert not full.share_stage1
    assert seed_overrides("stage1", 1) == ["train.seed=1001", "data.seed=10"]
    assert seed_overrides("stage2", 1) == ["train.seed=2001", "data.seed=11"]

    bad = tmp_path / "bad.yaml"
    for text, says in [
        ("cells:\n  - {name: s2, kind: stage2, from: nowhere}\n", r"cells\[0\]: 'from' must name an earlier cell"),
        ("cells: []\nsteps: 3\n", r"unknown key 'steps'"),
        ("cells:\n  - {name: 'a b', kind: stage1}\n", r"cells\[0\]: name 'a b' must start with a letter, digit or _,"),
        ("cells:\n  - {name: a, kind: stage4}\n", r"cells\[0\]: kind 'stage4'"),
        ("cells:\n  - {name: a, kind: model}\n", r"cells\[0\]: 'path' \(a run or model directory\) is required"),
        ("cells:\n  - {name: a, kind: model, path: x}\n  - {name: b, kind: stage3, from: a}\n",
         r"cells\[1\]: stage-3 cells need eval.kind: reasoning"),
        ("eval: {kind: reasoning}\ncells:\n  - {name: a, kind: stage1}\n  - {name: b, kind: stage3, from: a}\n",
         r"cells\[1\]: a stage3 cell starts from a stage2 or model cell"),
        ("eval: {kind: reasoning}\ncells:\n  - {name: a, kind: stage1, seeds: [0]}\n"
         "  - {name: b, kind: stage1, seeds: [0, 1], vs: a}\n", r"cells\[1\]: 'vs' names an earlier stage1 cell"),
        ("cells:\n  - {name: a, kind: stage1}\n  - {name: b, kind: stage1, vs: a}\n",
         r"cells\[1\]: 'vs' names an earlier stage1 cell with the same seeds, in a grid with eval.kind: reasoning")]:
        bad.write_text(text)
        with pytest.raises(UserError, match=r"bad\.yaml: " + says):
            load_grid(bad)
    s3 = load_grid(ROOT / "configs/ablations/stage3.yaml")
    assert [c.kind for c in s3.cells] == ["model", "stage3", "stage3", "stage3"]
    assert {o for c in s3.cells for o in c.overrides} == {"loss.name=dr_grpo", "loss.name=dapo"}
    assert seed_overrides("stage3", 1) == ["train.seed=3001", "data.seed=12"]


@pytest.mark.slow
def test_micro_grid_runs_resumes_and_regenerates_the_report(tmp_path, tiny_llama_dir, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    grid = write_grid(tmp_path, tiny_llama_dir, pairs, "  - {name: base, kind: base, axes: [stage]}\n"
                                                       "  - {name: s1, kind: stage1, axes: [stage]}")
    out, report = tmp_path / "out", tmp_path / "results" / "ablations.md"
    args = ["--grid", str(grid), "--out", str(out), "--report", str(report)]
    status = main(args)
    assert status == {"base": ["ran"], "s1": ["ran"]}
    g = load_grid(grid)
    for c in g.cells:
        d = run_dir(out, c, 0)
        ev = json.loads((d / "eval.json").read_text())
        assert 0.0 <= ev["metrics"]["rewards/accuracies"] <= 1.0 and ev["n_questions"] == 2
        cost = json.loads((d / "cost.json").read_text())
        assert cost["eval_s"] > 0 and "evaluate.py" in cost["eval_command"]
    assert json.loads((run_dir(out, g.cell("s1"), 0) / "cost.json").read_text())["train_s"] > 0
    text = report.read_text()
    s1 = json.loads((run_dir(out, g.cell("s1"), 0) / "eval.json").read_text())["metrics"]
    row = next(line for line in text.splitlines() if line.startswith("| `s1`"))
    assert f"{s1['nll']:.3f}" in row and f"--only s1`" in row  # the number and the command next to it
    assert "machine:" in text and "torch" in text and "OMP_NUM_THREADS=1" in text
    assert (report.parent / "ablations.png").is_file()

    # rerun: every cell is finished, nothing runs again, and the report is written anew
    stamp = {c.name: (run_dir(out, c, 0) / "eval.json").stat().st_mtime_ns for c in g.cells}
    report.unlink()
    assert main(args) == {"base": ["done"], "s1": ["done"]}
    assert {c.name: (run_dir(out, c, 0) / "eval.json").stat().st_mtime_ns for c in g.cells} == stamp
    load = lambda t: re.sub(r"load average when this report was written [\d./]+", "load average", t)  # noqa: E731
    assert load(report.read_text()).splitlines()[10:] == load(text).splitlines()[10:]  # the header has the command

    # a changed config makes the finished cell stale: not rerun, but flagged in the log and the report
    grid.write_text(grid.read_text().replace("lora.r=4", "lora.r=2"))
    capsys.readouterr()
    assert main(args) == {"base": ["done"], "s1": ["done"]}
    assert "s1 seed 0: finished but STALE, its config changed since (lora.r)" in capsys.readouterr().out
    rows = {line.split(" |")[0]: line for line in report.read_text().splitlines() if line.startswith("| `")}
    assert "**stale**" in rows["| `s1` **stale**"] and "**stale**" not in rows["| `base`"]

    # --only with a cell that does not exist: one clear error line, exit code 2
    with pytest.raises(SystemExit) as e:
        main([*args, "--only", "nope"])
    assert e.value.code == 2 and "--only nope: no such cell" in capsys.readouterr().err


def test_recursion_sweep_matches_recursive_thinking(tmp_path, tiny_llama_dir):
    """Greedy decoding: the sweep's N-round answers (with and without the integration) are exactly those of a direct
    `recursive_thinking` call, and both variants of one N come from a single run."""
    import torch

    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.reasoning import ModelGenerator, recursive_thinking

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    shutil.copytree(tiny_llama_dir, run / "final" / "model")
    (run / "config.json").write_text(json.dumps({"data": {"corpus": "ontology"}, "loss": {"name": "exo_pair"}}))
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    res = recursion_sweep(run, pairs, n_questions=1, max_new_tokens=5, critic=str(tiny_llama_dir), depths=[1, 2],
                          integrate=[False, True], out_dir=tmp_path / "sweep")
    assert set(res["variants"]) == {"N1", "N1+int", "N2", "N2+int"}
    assert [res["variants"][k]["metrics"]["calls_per_question"] for k in ("N1", "N2")] == [1, 4]  # 1 + 3 (N - 1)
    assert (tmp_path / "sweep" / "recursion.json").is_file() and (tmp_path / "sweep" / "recursion.md").is_file()

    model, tok = load_model_and_tokenizer(run / "final" / "model", dtype=torch.float32)
    cm, ct = load_model_and_tokenizer(tiny_llama_dir, dtype=torch.float32, add_reasoning_tokens=False)
    q = "What is bone, and how does it relate to enamel?"
    for integ in (False, True):
        direct = recursive_thinking(q, ModelGenerator(model.eval(), tok, None, None), ModelGenerator(cm.eval(), ct,
                                    None, None), n_rounds=2, integrate=integ, temperature=0.0, critic_temperature=0.0,
                                    max_new_tokens=5)
        sample = res["variants"]["N2+int" if integ else "N2"]["samples"][0]
        assert sample["answer"] == " ".join(direct.final_answer.split())
        assert sample["rounds"] == direct.answers and sample["calls"] == direct.n_calls


def test_training_phases_and_the_cost_estimate(tmp_path):
    # phases from file modification times
    d = tmp_path / "r"
    (d / "data").mkdir(parents=True)
    (d / "checkpoints" / "step_4").mkdir(parents=True)
    times = {"config.json": 100, "data/heldout.jsonl": 130, "data/iter_000.jsonl": 190, "checkpoints/step_4": 490,
             "summary.json": 520}
    for name, t in times.items():
        p = d / name
        if not p.exists():
            p.write_text("{}")
        os.utime(p, (t, t))
    assert training_phases(d) == {"setup_s": 30.0, "gen_s": 60.0, "train_s": 300.0, "finish_s": 30.0}
    # two iterations whose first checkpoint keep_last removed: the second generation counts as training, and the last
    # checkpoint is not mistaken for the end of the first iteration
    d2 = tmp_path / "r2"
    shutil.copytree(d, d2)
    (d2 / "data" / "iter_001.jsonl").write_text("{}")
    (d2 / "checkpoints" / "step_8").mkdir()
    for name, t in {**times, "data/iter_001.jsonl": 520, "checkpoints/step_8": 800, "summary.json": 830}.items():
        os.utime(d2 / name, (t, t))
    (d2 / "checkpoints" / "step_4").rmdir()
    assert training_phases(d2) == {"setup_s": 30.0, "gen_s": 60.0, "train_s": 610.0, "finish_s": 30.0}
    # no held-out pairs (setup inside the first generation), every pair generated up front (static data), and two
    # checkpoints of one iteration: training runs to the last of them
    d3 = tmp_path / "r3"
    (d3 / "data").mkdir(parents=True)
    for name, t in {"config.json": 100, "data/static.jsonl": 250, "checkpoints/step_6": 400,
                    "checkpoints/step_12": 550, "summary.json": 700}.items():
        p = d3 / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.mkdir() if name.startswith("checkpoints") else p.write_text("{}")
        os.utime(p, (t, t))
    assert training_phases(d3) == {"setup_s": 0.0, "gen_s": 150.0, "train_s": 300.0, "finish_s": 150.0}
    # a stage-3 run writes no pair files: no phases (not everything counted as the finish)
    d4 = tmp_path / "r4"
    (d4 / "checkpoints" / "step_40").mkdir(parents=True)
    (d4 / "config.json").write_text("{}")
    (d4 / "summary.json").write_text("{}")
    assert training_phases(d4) is None

    # a measured grid of one stage-1 cell, and a bigger grid estimated from it
    cfgs = "stage1: {config: configs/stage1_grounded.yaml, overrides: [%s]}\n"
    small = tmp_path / "small.yaml"
    small.write_text((cfgs % "train.iterations=1, train.steps_per_iteration=4, train.batch_size=1, "
                      "train.grad_accum=1, data.pairs_per_iteration=4, data.heldout_pairs=2, sample.max_new_tokens=50")
                     + "eval: {n_questions: 2, max_new_tokens: 10}\ncells:\n  - {name: s1, kind: stage1}\n")
    big = tmp_path / "big.yaml"
    big.write_text((cfgs % "train.iterations=2, train.steps_per_iteration=8, train.batch_size=2, "
                    "train.grad_accum=1, data.pairs_per_iteration=8, data.heldout_pairs=4, sample.max_new_tokens=100")
                   + "seeds: [0, 1]\neval: {n_questions: 4, max_new_tokens: 20}\n"
                   + "cells:\n  - {name: s1, kind: stage1}\n")
    out = tmp_path / "out"
    m = run_dir(out, load_grid(small).cell("s1"), 0)
    m.mkdir(parents=True)
    (m / "cost.json").write_text(json.dumps({"train_s": 420, "eval_s": 40, "phases": training_phases(d)}))
    est = estimate_cost(load_grid(big), load_grid(small), out)
    # setup x (4*100)/(2*50) = 4, generation x (2*8*100)/(4*50) = 8, training x (2*8*2)/(4) = 8, finish x 1,
    # evaluation x (4*20)/(2*10) = 4; two seeds
    per_seed = 30 * 4 + 60 * 8 + 300 * 8 + 30 + 40 * 4
    assert est["total_s"] == pytest.approx(2 * per_seed)
    assert est["missing_rates"] == []


@pytest.mark.slow
def test_stage3_grid_trains_from_a_model_and_reports_the_paired_difference(tmp_path, tiny_llama_dir):
    """A reasoning-graded grid: a model cell (trained outside the grid) and a stage-3 cell from it run for real; the
    stage-3 cell's eval.json holds the exact accuracy with its interval and the paired difference to its start
    model, recomputed here from the two reasoning.json files; the report's row carries both and the command."""
    from preflexor.metrics import paired_delta

    start = tmp_path / "stage2"
    shutil.copytree(tiny_llama_dir, start / "final" / "model")
    grid = tmp_path / "s3.yaml"
    grid.write_text(f"""name: s3
threads: 1
stage3: {{config: configs/stage3_grpo.yaml, overrides: [rl.group_size=4, rl.questions_per_step=2,
  sample.max_new_tokens=6, train.steps_per_iteration=2, train.eval_answers=2, train.eval_answer_tokens=4,
  train.batch_size=8, lora.r=4, lora.alpha=8]}}
eval: {{kind: reasoning, n_questions: 2, max_new_tokens: 4}}
cells:
  - {{name: s2, kind: model, path: {start}, axes: [stage]}}
  - {{name: s3, kind: stage3, from: s2, overrides: [loss.name=dapo], axes: [stage]}}
""")
    out, report = tmp_path / "out", tmp_path / "results" / "s3.md"
    assert main(["--grid", str(grid), "--out", str(out), "--report", str(report)]) == {"s2": ["ran"], "s3": ["ran"]}
    g = load_grid(grid)
    d2, d3 = run_dir(out, g.cell("s2"), 0), run_dir(out, g.cell("s3"), 0)
    cfg = json.loads((d3 / "config.json").read_text())
    assert cfg["loss"]["name"] == "dapo" and cfg["train"]["seed"] == 3000 and cfg["data"]["seed"] == 2
    assert cfg["model"]["source"].endswith("stage2/final/model")
    ev2, ev3 = (json.loads((d / "eval.json").read_text())["metrics"] for d in (d2, d3))
    assert "delta" not in ev2 and 0.0 <= ev3["exact_accuracy"] <= 1.0 and len(ev3["exact_accuracy_ci95"]) == 2
    a2, a3 = (json.loads((d / "reasoning.json").read_text())["models"][0]["answers"] for d in (d2, d3))
    assert a2["n"] == a3["n"] == 2
    want = paired_delta(a2, a3)
    assert ev3["delta"] == want["delta"] and ev3["delta_ci95"] == want["ci95"]
    text = report.read_text()
    assert "| cell | n | exact acc | Δ vs from | format |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `s3`"))
    assert f"{ev3['exact_accuracy']:.3f}" in row and "--only s3`" in row
    assert f"(the model of `{start}`, trained outside the grid)" in text
    assert (report.parent / "s3.png").is_file()


def test_a_knob_is_compared_with_the_default_seed_by_seed(tmp_path):
    """`vs`: each seed's paired difference on the same questions, their mean and spread, the t-interval over seeds
    deciding "beyond its spread", and the pooled bootstrap; the report's table says which knob moved accuracy."""
    import math

    from ablations import versus, write_report
    from preflexor.metrics import bootstrap_ci

    grid = tmp_path / "g.yaml"
    grid.write_text("""name: g
eval: {kind: reasoning, n_questions: 10, max_new_tokens: 8}
seeds: [0, 1, 2]
cells:
  - {name: s1, kind: stage1, seeds: [0]}
  - {name: d, kind: stage2, from: s1}
  - {name: up, kind: stage2, from: s1, vs: d}
  - {name: same, kind: stage2, from: s1, vs: d}
""")
    g, out = load_grid(grid), tmp_path / "out"
    right = {"d": [3, 4, 5], "up": [7, 7, 8], "same": [4, 3, 5]}  # correct answers of 10, per seed
    for name, ks in right.items():
        for seed, k in enumerate(ks):
            d = run_dir(out, g.cell(name), seed)
            d.mkdir(parents=True)
            samples = [{"correct": i < k} for i in range(10)]
            (d / "reasoning.json").write_text(json.dumps({"models": [{"answers": {
                "n": 10, "exact_accuracy": k / 10, "samples": samples}}]}))
    up, same = versus(g, g.cell("up"), out), versus(g, g.cell("same"), out)
    assert up["per_seed"] == {0: 0.4, 1: 0.3, 2: 0.3} and same["per_seed"] == {0: 0.1, 1: -0.1, 2: 0.0}
    sd = math.sqrt(sum((x - 1 / 3) ** 2 for x in (0.4, 0.3, 0.3)) / 2)
    assert math.isclose(up["mean"], 1 / 3) and math.isclose(up["sd"], sd)
    assert math.isclose(up["t_ci95"][0], round(1 / 3 - 4.303 * sd / math.sqrt(3), 4))
    assert up["beyond_spread"] and not same["beyond_spread"] and not same["beyond_sd"]
    pooled = [float(k <= i < u) for k, u in zip(right["d"], right["up"]) for i in range(10)]  # questions x seeds
    assert up["pooled_ci95"] == bootstrap_ci(pooled)
    text = write_report(g, out, tmp_path / "r.md", "cmd")
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| `up`") or
            line.startswith("| `same`")}
    assert rows["| `up`"].endswith("| **yes** |") and "+0.400, +0.300, +0.300" in rows["| `up`"]
    assert rows["| `same`"].endswith("| no |")
    # a stage without `vs` against the stage-1 model every seed starts from (seed 0 of s1, shared)
    s1 = run_dir(out, g.cell("s1"), 0)
    s1.mkdir(parents=True)
    (s1 / "reasoning.json").write_text(json.dumps({"models": [{"answers": {
        "n": 10, "exact_accuracy": 0.5, "samples": [{"correct": i < 5} for i in range(10)]}}]}))
    d = versus(g, g.cell("d"), out)
    assert d["per_seed"] == {0: -0.2, 1: -0.1, 2: 0.0} and math.isclose(d["mean"], -0.1)
    row = next(line for line in write_report(g, out, tmp_path / "r.md", "cmd").splitlines()
               if line.startswith("| `d` | `s1` |"))
    assert "-0.200, -0.100, +0.000" in row
