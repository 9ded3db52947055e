"""The paper's ablations as a resumable grid (preflexor.md §6): which knobs of PRefLexOR matter, measured on the
embedded default (SmolLM2-135M-Instruct, the ontology corpus, the grounded teacher).

    python ablations.py --grid configs/ablations/reduced.yaml [--out runs/ablations/reduced]
        [--report results/ablations.md] [--only CELL ...] [--force] [--report-only]

A grid (configs/ablations/*.yaml) lists cells, each one setting repeated over seeds: `base` (the base model,
evaluated only), `model` (a run trained outside the grid, `path:`, evaluated only), `stage1` (`train_orpo.py` with
overrides, then the evaluation), `stage2` (`train_dpo.py` from a stage-1 cell's merged model, `from:`), `stage3`
(`train_rl.py` from a stage-2 or model cell) and `recursion` (inference only: a stage-2 cell's model answers with N
rounds of `reasoning.recursive_thinking`, the base model as critic, with and without the final integration;
`python ablations.py recursion ...`). The evaluation is `evaluate.py` on a grounded question set (`eval.kind:
grounded`, the default) or `eval_reasoning.py` on the fixed held-out set of the reasoning teacher (`eval.kind:
reasoning`: exact accuracy with its interval, and the paired difference to the `from` cell; stage-3 grids,
configs/ablations/stage3.yaml). Every step is a subprocess (OMP_NUM_THREADS from the grid) into
`<out>/runs/<cell>/seed<k>/`, keeping its command, log and wall time (cost.json). A cell whose eval.json exists is
never rerun and an interrupted training resumes (`train.resume=auto`), so rerunning the command continues the grid;
then the report (results/ablations.md: mean ± std over seeds, the command of every number, commit, machine, date,
measured costs and the full grid's estimated cost) and its PNGs are regenerated. Seed k sets train.seed = 1000 + k
and data.seed = 10 k in stage 1, 2000 + k and 10 k + 1 in stage 2, 3000 + k and 10 k + 2 in stage 3, so stages and
seeds never share generated contexts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from preflexor import fast
from preflexor.checkpoint import load_model_and_tokenizer, read_run_config, run_model_source
from preflexor.config import RunConfig, from_dict, load_config, to_dict
from preflexor.data import load_pairs
from preflexor.errors import UserError, exit_on_user_error
from preflexor.metrics import (METRIC_DOC, _mean, bootstrap_ci, corpus_graph, paired_delta, score_answers,
                               summarize_answers)
from preflexor.reasoning import ModelGenerator, recursive_thinking
from preflexor.thinking import THINK_START, TRIGGER, split_thinking
from preflexor.utils import atomic_write_json, atomic_write_text, git_hash, machine_info, save_png

ROOT = Path(__file__).resolve().parent
KINDS = ("base", "model", "stage1", "stage2", "stage3", "recursion")
SCRIPTS = {"stage1": "train_orpo.py", "stage2": "train_dpo.py", "stage3": "train_rl.py"}
STAGE_CONFIG = {"stage1": "configs/stage1_orpo.yaml", "stage2": "configs/stage2_exo.yaml",
                "stage3": "configs/stage3_grpo.yaml"}
FROM = {"stage2": ("stage1",), "stage3": ("stage2", "model"), "recursion": ("stage2",)}  # kind -> start kinds
# columns of the report: metric key in eval.json -> header
TABLE_METRICS = {"rewards/accuracies": "reward acc", "rewards/margins": "reward margin", "nll": "NLL chosen",
                 "logps/accuracies": "logp acc", "format_rate": "format", "token_f1": "F1", "rouge_l": "ROUGE-L",
                 "concept_recall": "concept recall", "answer_words": "answer words", "tokens_per_s": "tok/s"}
# columns of a grid with `eval.kind: reasoning` (eval_reasoning.py on the fixed held-out set of tasks.answer_set)
REASONING_METRICS = {"exact_accuracy": "exact acc", "delta": "Δ vs from", "format_rate": "format",
                     "opens_thinking_rate": "opens thinking", "truncated_rate": "truncated", "factuality": "factuality"}
REASONING_DOC = {"exact_accuracy": "exact accuracy of the greedy final answers against the graph's gold answers "
                 "(bootstrap 95% interval of each seed in brackets)",
                 "delta": "exact accuracy minus that of the `from` cell's model on the same questions (paired "
                 "bootstrap 95% interval of each seed in brackets)",
                 "factuality": "share of the is-a relations stated in the thinking that are true in the graph"}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")  # a folder name: not "..", ".", "-x" or hidden


# -- The grid ----------------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    name: str
    kind: str
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    source: str | None = None  # `from:` the cell whose model this one starts from / answers with
    axes: list[str] = field(default_factory=list)  # report sections the cell appears in
    label: str = ""
    path: str | None = None  # model cells: the run or model directory evaluated (trained outside the grid)
    depth: int | None = None  # recursion cells
    integrate: bool | None = None
    group: str = ""  # recursion cells: the grid entry they were expanded from (one sweep computes the group)
    vs: str | None = None  # reasoning grids: the cell this one is compared with, seed by seed (the default)


@dataclass
class Grid:
    path: Path
    name: str
    threads: int
    share_stage1: bool
    stage: dict  # "stage1"/"stage2"/"stage3" -> {"config": path, "overrides": [...]}
    eval: dict  # kind (grounded | reasoning), n_questions, max_new_tokens, eval_set {n, seed}
    recursion: dict  # n_questions, max_new_tokens, critic
    cells: list[Cell]
    estimate: str | None  # another grid whose cost is estimated from this one's measurements
    description: str = ""
    base_model: str = "smollm2-135m-instruct"

    def eval_set(self, out: Path) -> Path:
        """The shared question set: `eval.eval_set.file` if given, else generated into `<out>/eval_set.jsonl`."""
        f = self.eval["eval_set"].get("file")
        return Path(f) if f else out / "eval_set.jsonl"

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


def _req(d: dict, key: str, where: str, types):
    if key not in d:
        raise UserError(f"{where}: missing key '{key}'")
    if not isinstance(d[key], types):
        raise UserError(f"{where}: key '{key}' has the wrong type ({type(d[key]).__name__})")
    return d[key]


def load_grid(path: str | Path) -> Grid:
    """Parse and check a grid YAML; recursion entries expand into one cell per (depth, integrate)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: grid file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML") from None
    known = {"name", "description", "threads", "seeds", "share_stage1", "stage1", "stage2", "stage3", "eval",
             "recursion", "cells", "estimate", "base_model"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}' (valid: {', '.join(sorted(known))})")
    default_seeds = raw.get("seeds", [0])
    stage = {}
    for s in SCRIPTS:
        sec = raw.get(s) or {}
        stage[s] = {"config": sec.get("config", STAGE_CONFIG[s]),
                    "overrides": [str(o) for o in sec.get("overrides") or []]}
    ev = {"kind": "grounded", "n_questions": 8, "max_new_tokens": 128, "eval_set": {"n": 8, "seed": 7},
          **(raw.get("eval") or {})}
    if ev["kind"] not in ("grounded", "reasoning"):
        raise UserError(f"{path}: eval.kind {ev['kind']!r} (valid: grounded, reasoning)")
    base_model = str(raw.get("base_model", "smollm2-135m-instruct"))
    rec = {"n_questions": 4, "max_new_tokens": 96, "critic": base_model, **(raw.get("recursion") or {})}
    cells: list[Cell] = []
    for i, c in enumerate(_req(raw, "cells", str(path), list)):
        where = f"{path}: cells[{i}]"
        if not isinstance(c, dict):
            raise UserError(f"{where}: must be a mapping")
        name, kind = str(_req(c, "name", where, (str, int))), _req(c, "kind", where, str)
        if not _NAME.fullmatch(name):
            raise UserError(f"{where}: name {name!r} must start with a letter, digit or _, then those or . + = -")
        if kind not in KINDS:
            raise UserError(f"{where}: kind {kind!r} (valid: {', '.join(KINDS)})")
        bad = sorted(set(c) - {"name", "kind", "seeds", "overrides", "from", "axes", "label", "depths", "integrate",
                               "path", "vs"})
        if bad:
            raise UserError(f"{where}: unknown key '{bad[0]}'")
        if (kind == "model") != ("path" in c):
            raise UserError(f"{where}: 'path' (a run or model directory) is " +
                            ("required for a model cell" if kind == "model" else "only for model cells"))
        seeds = [0] if kind in ("base", "model") else [int(s) for s in c.get("seeds", default_seeds)]
        src = c.get("from")
        if kind in FROM:
            if src is None or not any(p.name == src for p in cells):
                raise UserError(f"{where}: 'from' must name an earlier cell (got {src!r})")
            if next(p for p in cells if p.name == src).kind not in FROM[kind]:
                raise UserError(f"{where}: a {kind} cell starts from a {' or '.join(FROM[kind])} cell; {src!r} is "
                                "not one")
        if kind == "stage3" and ev["kind"] != "reasoning":
            raise UserError(f"{where}: stage-3 cells need eval.kind: reasoning (their rewards are exact answers)")
        if kind == "recursion" and ev["kind"] != "grounded":
            raise UserError(f"{where}: recursion cells sweep the grounded eval set (eval.kind: grounded)")
        vs = c.get("vs")
        if vs is not None:
            other = next((p for p in cells if p.name == vs), None)
            if ev["kind"] != "reasoning" or other is None or other.kind != kind or \
                    not set(seeds) <= set(other.seeds):
                raise UserError(f"{where}: 'vs' names an earlier {kind} cell with the same seeds, in a grid with "
                                f"eval.kind: reasoning (got {vs!r})")
        common = dict(overrides=[str(o) for o in c.get("overrides") or []], source=src, vs=vs,
                      axes=list(c.get("axes") or []), label=str(c.get("label", "")),
                      path=str(c["path"]) if "path" in c else None)
        if kind == "recursion":
            for d in c.get("depths", [1, 2, 3]):
                for integ in c.get("integrate", [False, True]):
                    label = f"N={d}" + (" + integration" if integ else "")
                    cells.append(Cell(f"{name}_N{d}{'+int' if integ else ''}", kind, seeds, depth=int(d),
                                      integrate=bool(integ), group=name, **{**common, "label": label}))
        else:
            cells.append(Cell(name, kind, seeds, **common))
    names = [c.name for c in cells]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{path}: duplicate cell name {dup[0]!r}")
    return Grid(path, str(raw.get("name", path.stem)), int(raw.get("threads", 1)), bool(raw.get("share_stage1", True)),
                stage, ev, rec, cells, raw.get("estimate"), str(raw.get("description", "")).strip(), base_model)


def seed_overrides(kind: str, seed: int) -> list[str]:
    """Seed k of a stage: its own training seed and data seed (contexts, rejected samples, held-out pairs)."""
    stage = {"stage1": 0, "stage2": 1, "stage3": 2}.get(kind, 1)
    return [f"train.seed={1000 * (stage + 1) + seed}", f"data.seed={10 * seed + stage}"]


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    return out / "runs" / cell.name / f"seed{seed}"


def cell_model_dir(out: Path, cell: Cell, seed: int) -> Path:
    """The run directory whose final/model a cell evaluates: its own, or a model cell's `path`."""
    if cell.kind == "model":
        return Path(cell.path) if Path(cell.path).is_absolute() else ROOT / cell.path
    return run_dir(out, cell, seed)


def source_dir(grid: Grid, cell: Cell, seed: int, out: Path) -> Path:
    """The run directory of the model a cell starts from (its `from` cell's, at the seed it starts from)."""
    parent = grid.cell(cell.source)
    return cell_model_dir(out, parent, source_seed(grid, cell, seed))


def _finished(d: Path) -> bool:
    return (d / "final" / "model" / "config.json").is_file()


def source_seed(grid: Grid, cell: Cell, seed: int) -> int:
    """Which seed of the `from` cell a cell starts from: the first one when stage 1 is shared."""
    parent = grid.cell(cell.source)
    if cell.kind == "stage2" and grid.share_stage1:
        return parent.seeds[0]
    return seed if seed in parent.seeds else parent.seeds[0]


def _rel(p: Path) -> str:
    """A path relative to the repository root where it is inside it (symbolic links kept), else as given."""
    try:
        return str(Path(os.path.abspath(p)).relative_to(ROOT))
    except ValueError:
        return str(p)


def eval_set_command(grid: Grid, out: Path) -> list[str]:
    es = grid.eval["eval_set"]
    return [sys.executable, "-m", "preflexor.datagen", "--out", _rel(out / "eval_set.jsonl"), "--n", str(es["n"]),
            "--no-progress", "rejected=teacher_incorrect", f"seed={es['seed']}"]


def train_command(grid: Grid, cell: Cell, seed: int, out: Path) -> list[str]:
    st = grid.stage[cell.kind]
    cmd = [sys.executable, SCRIPTS[cell.kind], "--config", st["config"], *st["overrides"],
           *seed_overrides(cell.kind, seed), *cell.overrides, f"train.out_dir={_rel(run_dir(out, cell, seed))}"]
    if cell.kind in ("stage2", "stage3"):
        cmd.append(f"model.source={_rel(source_dir(grid, cell, seed, out) / 'final' / 'model')}")
    return cmd


def eval_command(grid: Grid, cell: Cell, seed: int, out: Path) -> list[str]:
    if grid.eval["kind"] == "reasoning":
        return [sys.executable, "eval_reasoning.py", grid.base_model if cell.kind == "base" else
                _rel(cell_model_dir(out, cell, seed)), "--n", str(grid.eval["n_questions"]), "--max-new-tokens",
                str(grid.eval["max_new_tokens"]), "--probe", "0", "--out", _rel(run_dir(out, cell, seed))]
    d, qs = _rel(run_dir(out, cell, seed)), _rel(grid.eval_set(out))
    what = (["base", "--base-model", grid.base_model, "--heldout", qs, "--out", d] if cell.kind == "base" else
            [d, "--questions", qs])
    return [sys.executable, "evaluate.py", *what, "--n", str(grid.eval["n_questions"]),
            "--max-new-tokens", str(grid.eval["max_new_tokens"])]


def sweep_dir(out: Path, cell: Cell, seed: int) -> Path:
    return out / "runs" / f"{cell.group}_sweep" / f"seed{seed}"


def recursion_command(grid: Grid, cell: Cell, seed: int, out: Path) -> list[str]:
    """One sweep per (from-cell model, seed) computes every depth/integration cell of that recursion entry."""
    sibs = [c for c in grid.cells if c.kind == "recursion" and c.group == cell.group]
    rc = grid.recursion
    return [sys.executable, "ablations.py", "recursion", _rel(source_dir(grid, cell, seed, out)),
            "--questions", _rel(grid.eval_set(out)),
            "--n", str(rc["n_questions"]), "--max-new-tokens", str(rc["max_new_tokens"]), "--critic", str(rc["critic"]),
            "--depths", ",".join(str(d) for d in sorted({c.depth for c in sibs})),
            "--integrate", ",".join(sorted({"yes" if c.integrate else "no" for c in sibs})),
            "--out", _rel(sweep_dir(out, cell, seed))]


def stale_keys(grid: Grid, cell: Cell, seed: int, out: Path) -> list[str]:
    """Config keys of a finished training run that differ from what its command resolves to now (the grid or a
    shipped config changed since, so its numbers no longer follow from its command); a cell started from a stale
    one is stale too."""
    if cell.source is not None:
        parent = grid.cell(cell.source)
        if stale_keys(grid, parent, source_seed(grid, cell, seed), out):
            return [f"{parent.name} (start model)"]
    path = run_dir(out, cell, seed) / "config.json"
    if cell.kind not in SCRIPTS or not path.is_file():
        return []
    old = json.loads(path.read_text())
    cmd = train_command(grid, cell, seed, out)
    new = to_dict(load_config(RunConfig, ROOT / grid.stage[cell.kind]["config"], cmd[4:]))
    return [f"{sec}.{k}" for sec, vals in new.items() for k, v in vals.items() if (old.get(sec) or {}).get(k) != v]


def _show(cmd: list[str]) -> str:
    return " ".join(shlex.quote("python" if i == 0 and c == sys.executable else c) for i, c in enumerate(cmd))


def _run(cmd: list[str], log: Path, threads: int) -> tuple[int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {_show(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def _cost(d: Path) -> dict:
    p = d / "cost.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def training_phases(d: Path) -> dict | None:
    """Wall seconds of a finished training run's phases, from its files' modification times: setup (model, corpus,
    held-out pairs: config.json -> data/heldout.jsonl; 0 without held-out pairs, when the first generation counts it),
    generation of each iteration's pairs (-> data/iter_k.jsonl, or all of them at once -> data/static.jsonl),
    training steps (-> the last checkpoint before the next pairs), and the finish (answer evaluation, merge, save ->
    summary.json). None for a run without pair files (stage 3 samples as it trains: no phase boundary to read)."""
    if not any((d / "data").glob("iter_*.jsonl")) and not (d / "data" / "static.jsonl").is_file():
        return None
    try:
        t_cfg, t_end = (d / "config.json").stat().st_mtime, (d / "summary.json").stat().st_mtime
    except OSError:
        return None
    held = d / "data" / "heldout.jsonl"
    t_held = held.stat().st_mtime if held.is_file() else t_cfg
    iters = sorted((d / "data").glob("iter_*.jsonl")) or sorted((d / "data").glob("static.jsonl"))
    ckpts = sorted(p.stat().st_mtime for p in (d / "checkpoints").glob("step_*"))
    gen = train = 0.0
    prev = t_held
    for k, it in enumerate(iters):
        t_it = it.stat().st_mtime
        gen += max(0.0, t_it - prev)
        t_next = iters[k + 1].stat().st_mtime if k + 1 < len(iters) else t_end
        nxt = [t for t in ckpts if t_it <= t <= t_next]  # this iteration's last checkpoint, unless keep_last removed
        prev = nxt[-1] if nxt else t_next  # it: then the next iteration's generation is counted as training (errs high)
        train += max(0.0, prev - t_it)
    return {"setup_s": round(t_held - t_cfg, 1), "gen_s": round(gen, 1), "train_s": round(train, 1),
            "finish_s": round(max(0.0, t_end - prev), 1)}


# -- Running the grid --------------------------------------------------------------------------------------------------

def run_grid(grid: Grid, out: Path, only: list[str] | None = None, force: bool = False, log=print) -> dict:
    """Run every missing cell (or the cells in `only` and what they need) and return {cell: [status per seed]}."""
    out.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in grid.cells]
    for n in only or []:
        if n not in names:
            raise UserError(f"--only {n}: no such cell (cells: {', '.join(names)})")
    wanted, todo = set(only or names), list(only or [])
    while todo:  # the cells a requested cell starts from
        src = grid.cell(todo.pop()).source
        if src and src not in wanted:
            wanted.add(src)
            todo.append(src)
    cells = [c for c in grid.cells if c.name in wanted]
    if force:
        for c in grid.cells:
            if c.name in (only or names):
                shutil.rmtree(out / "runs" / c.name, ignore_errors=True)
                if c.kind == "recursion":
                    shutil.rmtree(out / "runs" / f"{c.group}_sweep", ignore_errors=True)
    status: dict[str, list[str]] = {}
    es = grid.eval_set(out)
    if grid.eval["kind"] == "grounded" and (not es.is_file() or (not grid.eval["eval_set"].get("file") and
                                            sum(1 for _ in open(es)) < grid.eval["eval_set"]["n"])):
        if grid.eval["eval_set"].get("file"):
            raise UserError(f"{grid.path}: eval.eval_set.file {es} not found")
        log(f"[grid] eval set -> {es}")
        cmd = eval_set_command(grid, out)
        rc, dt = _run(cmd, out / "eval_set.log", grid.threads)
        if rc != 0:
            raise UserError(f"building the eval set failed (exit {rc}); see {out / 'eval_set.log'}")
        atomic_write_json(out / "cost.json", {"eval_set_s": round(dt, 1), "command": _show(cmd)})
    for c in cells:
        status[c.name] = []
        for seed in c.seeds:
            d = run_dir(out, c, seed)
            if (d / "eval.json").is_file():
                status[c.name].append("done")
                stale = stale_keys(grid, c, seed, out)
                if stale:
                    log(f"[grid] {c.name} seed {seed}: finished but STALE, its config changed since "
                        f"({', '.join(stale)}); rerun it with --only {c.name} --force")
                continue
            if c.kind == "recursion":
                status[c.name].append(_run_recursion(grid, c, seed, out, log))
                continue
            if c.kind == "model" and not _finished(cell_model_dir(out, c, seed)):
                log(f"[grid] {c.name}: skipped, {c.path}/final/model not found (train it first; see the grid file)")
                status[c.name].append("blocked")
                continue
            cost = _cost(d)
            if c.kind in SCRIPTS and (d / "summary.json").is_file() and "train_s" not in cost:
                # trained outside this runner (or the runner was stopped while the training finished): file times
                secs = (d / "summary.json").stat().st_mtime - (d / "config.json").stat().st_mtime
                cost.update(train_s=round(secs, 1),
                            train_command=_show(train_command(grid, c, seed, out)), phases=training_phases(d))
            if c.kind in SCRIPTS and not (d / "summary.json").is_file():
                if c.kind != "stage1" and not _finished(source_dir(grid, c, seed, out)):
                    log(f"[grid] {c.name} seed {seed}: skipped, the cell it starts from ({c.source}) did not finish")
                    status[c.name].append("blocked")
                    continue
                cmd = train_command(grid, c, seed, out)
                log(f"[grid] {c.name} seed {seed}: train  ({_show(cmd)})")
                rc, dt = _run(cmd, d / "train.log", grid.threads)
                cost.update(train_s=round(cost.get("train_s", 0.0) + dt, 1), train_command=_show(cmd))
                atomic_write_json(d / "cost.json", cost)
                if rc != 0:
                    log(f"[grid] {c.name} seed {seed}: training failed (exit {rc}); see {d / 'train.log'}")
                    status[c.name].append("failed")
                    continue
                cost["phases"] = training_phases(d)
            cmd = eval_command(grid, c, seed, out)
            log(f"[grid] {c.name} seed {seed}: eval  ({_show(cmd)})")
            rc, dt = _run(cmd, d / "eval.log", grid.threads)
            cost.update(eval_s=round(dt, 1), eval_command=_show(cmd))
            atomic_write_json(d / "cost.json", cost)
            if rc == 0 and grid.eval["kind"] == "reasoning":
                rc = _reasoning_eval_json(grid, c, seed, out, cmd, log)
            status[c.name].append("ran" if rc == 0 else "failed")
            if rc != 0:
                log(f"[grid] {c.name} seed {seed}: evaluation failed (exit {rc}); see {d / 'eval.log'}")
    return status


def _reasoning_eval_json(grid: Grid, cell: Cell, seed: int, out: Path, cmd: list[str], log) -> int:
    """eval.json of a reasoning-graded cell from the reasoning.json eval_reasoning.py wrote beside it: the exact
    accuracy with its interval, the rates, and the paired difference to the `from` cell's model (same questions)."""
    d = run_dir(out, cell, seed)
    res = json.loads((d / "reasoning.json").read_text())
    a = res["models"][0]["answers"]
    m = {k: a[k] for k in ("exact_accuracy", "format_rate", "opens_thinking_rate", "truncated_rate", "factuality")}
    m["exact_accuracy_ci95"] = a["ci95"]
    if cell.source is not None:
        src = run_dir(out, grid.cell(cell.source), source_seed(grid, cell, seed)) / "reasoning.json"
        if not src.is_file():
            log(f"[grid] {cell.name} seed {seed}: no evaluation of {cell.source} at {src} to compare with")
            return 1
        delta = paired_delta(json.loads(src.read_text())["models"][0]["answers"], a)
        m.update(delta=delta["delta"], delta_ci95=delta["ci95"])
    atomic_write_json(d / "eval.json", {"run": res["models"][0]["run"], "kind": cell.kind, "metrics": m,
                                         "n": res["n"], "max_new_tokens": res["max_new_tokens"], "git": res["git"],
                                         "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                         "machine": res["machine"], "command": _show(cmd)})
    return 0


def _run_recursion(grid: Grid, cell: Cell, seed: int, out: Path, log) -> str:
    start = source_dir(grid, cell, seed, out)
    if not _finished(start):
        log(f"[grid] {cell.name} seed {seed}: skipped, {cell.source} did not finish")
        return "blocked"
    cmd, sweep = recursion_command(grid, cell, seed, out), sweep_dir(out, cell, seed)
    if not (sweep / "recursion.json").is_file():
        log(f"[grid] {cell.group} seed {seed}: recursion sweep  ({_show(cmd)})")
        rc, dt = _run(cmd, sweep / "recursion.log", grid.threads)
        atomic_write_json(sweep / "cost.json", {"sweep_s": round(dt, 1), "command": _show(cmd)})
        if rc != 0:
            log(f"[grid] recursion sweep failed (exit {rc}); see {sweep / 'recursion.log'}")
            return "failed"
    sw = json.loads((sweep / "recursion.json").read_text())
    key = f"N{cell.depth}{'+int' if cell.integrate else ''}"
    if key not in sw["variants"]:
        log(f"[grid] {cell.name}: the sweep at {sweep} has no variant {key}")
        return "failed"
    d = run_dir(out, cell, seed)
    v = sw["variants"][key]
    total = max(sum(x["seconds"] for x in sw["variants"].values()), 1e-9)
    share = _cost(sweep).get("sweep_s", 0.0) * v["seconds"] / total
    atomic_write_json(d / "cost.json", {"eval_s": round(share, 1), "eval_command": _show(cmd),
                                        "note": "share of the sweep's time"})
    atomic_write_json(d / "eval.json", {"run": str(start), "kind": "recursion", "variant": key,
                                         "metrics": v["metrics"], "samples": v["samples"], "git": sw["git"],
                                         "date": sw["date"], "machine": sw["machine"], "command": _show(cmd)})
    return "ran"


# -- The recursion sweep (inference-time ablation) ---------------------------------------------------------------------

def recursion_sweep(model_dir: str | Path, questions: str | Path, n_questions: int = 4, max_new_tokens: int = 96,
                    critic: str = "smollm2-135m-instruct", depths: list[int] = (1, 2, 3),
                    integrate: list[bool] = (False, True), out_dir: str | Path | None = None,
                    command: str | None = None) -> dict:
    """Answer each question with `recursive_thinking` at every depth N (greedy; reasoner = the run's model, critic =
    `critic`), score the final answers like evaluate.py (`score_answers`), write recursion.json and recursion.md in
    `out_dir`. One run with integration gives both variants of an N: they share every call but the final integration,
    and without it the final answer is the last non-empty round's answer."""
    import torch

    model_dir = Path(model_dir)
    run_cfg = from_dict(RunConfig, read_run_config(model_dir), where=f"{model_dir}/config.json")
    records = load_pairs(questions)[:n_questions]
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(run_model_source(model_dir, critic), dtype=torch.float32)
    cmodel, ctok = load_model_and_tokenizer(critic, dtype=torch.float32, add_reasoning_tokens=False)
    fast.install(model, run_cfg.model.fast)
    fast.install(cmodel, run_cfg.model.fast)
    reasoner = ModelGenerator(model.eval(), tok, top_k=None, top_p=None, name="reasoner")
    crit = ModelGenerator(cmodel.eval(), ctok, top_k=None, top_p=None, name="critic")
    graph = corpus_graph(run_cfg.data.corpus)
    variants: dict[str, dict] = {}
    per: dict[tuple, list] = {}  # (depth, integrate) -> per question (final answer, result, seconds, tokens, calls)
    for d in sorted(set(depths)):
        for rec in records:
            q = (rec.get("meta") or {}).get("question") or rec["prompt"].replace(TRIGGER, "").strip()
            res = recursive_thinking(q, reasoner, crit, n_rounds=d, integrate=True in integrate, temperature=0.0,
                                     critic_temperature=0.0, max_new_tokens=max_new_tokens,
                                     system=run_cfg.data.system_prompt)
            last = next((r.answer for r in reversed(res.rounds) if r.answer), "")
            for integ in integrate:
                calls = [c for c in res.calls if integ or c.step != "integrate"]
                per.setdefault((d, integ), []).append((
                    res.final_answer if integ else last, res, sum(c.seconds for c in calls),
                    sum(c.completion_tokens or 0 for c in calls), len(calls)))
    for (d, integ), items in per.items():
        rows = score_answers([f for f, *_ in items], records, graph)
        for r, (_, res, s, _t, n_calls) in zip(rows, items):
            first = split_thinking(res.rounds[0].response)
            r.update(well_formed=first["well_formed"], issue=first["issue"],
                     opens_thinking=res.rounds[0].response.lstrip().startswith(THINK_START), calls=n_calls,
                     seconds=round(s, 2), rounds=[x.answer for x in res.rounds])
        m = summarize_answers(rows)
        secs, toks = sum(it[2] for it in items), sum(it[3] for it in items)
        m.update(tokens_per_s=toks / secs if secs > 0 else None, calls_per_question=_mean([it[4] for it in items]))
        variants[f"N{d}{'+int' if integ else ''}"] = {"depth": d, "integrate": integ, "metrics": m, "samples": rows,
                                                       "seconds": secs}
    result = {"model": str(model_dir), "critic": critic, "questions": str(questions), "n_questions": len(records),
              "max_new_tokens": max_new_tokens, "variants": variants, "git": git_hash(), "machine": machine_info(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": command or "python ablations.py recursion " + " ".join(sys.argv[2:])}
    if out_dir is not None:
        lines = [f"# Recursive reasoning sweep of `{model_dir}`", "", f"critic `{critic}`, {len(records)} questions, "
                 f"max {max_new_tokens} new tokens per call, greedy; command: `{result['command']}`", "",
                 "| variant | F1 | ROUGE-L | concept recall | answer words | calls/question |",
                 "|---|---|---|---|---|---|"]
        for k, v in variants.items():
            mm = v["metrics"]
            lines.append(f"| {k} | {_f(mm['token_f1'])} | {_f(mm['rouge_l'])} | {_f(mm['concept_recall'])} | "
                         f"{_f(mm['answer_words'])} | {_f(mm['calls_per_question'])} |")
        atomic_write_text(Path(out_dir) / "recursion.md", "\n".join(lines) + "\n")
        atomic_write_json(Path(out_dir) / "recursion.json", result)
    return result


def _f(v, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


# -- The report --------------------------------------------------------------------------------------------------------

def _stats(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))  # sample std (n - 1)


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def versus(grid: Grid, cell: Cell, out: Path) -> dict | None:
    """A cell against its `vs` cell on the same questions, seed by seed (seed k of both: the same training and data
    seeds), or, without `vs`, against the `from` cell it starts from (at the seed it starts from): each seed's
    paired accuracy difference, their mean and sample std over seeds, the 95% t-interval of that mean (the spread
    between trainings), and a paired bootstrap over questions and seeds pooled (question noise only). None until
    some seed of both is evaluated."""
    def evaluation(c: Cell, seed: int) -> Path:
        return run_dir(out, c, seed) / "reasoning.json"

    other, per_seed, pooled = grid.cell(cell.vs or cell.source), {}, []
    for seed in cell.seeds:
        pair = evaluation(other, seed if cell.vs else source_seed(grid, cell, seed)), evaluation(cell, seed)
        if not all(p.is_file() for p in pair):
            continue
        a, b = (json.loads(p.read_text())["models"][0]["answers"] for p in pair)
        per_seed[seed] = paired_delta(a, b)["delta"]
        pooled += [float(y["correct"]) - float(x["correct"]) for x, y in zip(a["samples"], b["samples"])]
    if not per_seed:
        return None
    mean, sd = _stats(list(per_seed.values()))
    n = len(per_seed)
    half = _T975.get(n - 1, 1.96) * sd / math.sqrt(n) if sd is not None else None
    ci = [round(mean - half, 4), round(mean + half, 4)] if half is not None else None
    return {"per_seed": per_seed, "mean": mean, "sd": sd, "t_ci95": ci, "pooled_ci95": bootstrap_ci(pooled),
            "beyond_spread": bool(ci and (ci[0] > 0 or ci[1] < 0)), "beyond_sd": bool(sd and abs(mean) > sd)}


def versus_lines(grid: Grid, out: Path) -> list[str]:
    """The report's table of every cell against its `vs` cell, and of every stage-2/3 cell without one against the
    cell it starts from (`versus`)."""
    if grid.eval["kind"] != "reasoning":  # `vs` needs it; the comparison reads reasoning.json
        return []
    cells = [c for c in grid.cells if c.vs or c.kind in ("stage2", "stage3")]
    if not cells:
        return []
    lines = ["## Each stage against its start, each knob against the default (paired by seed)", "",
             "Δ = exact accuracy of the cell minus that of its `vs` cell at the same seed (same training seed, data "
             "seed and questions), or, for a stage without `vs`, minus that of the model it starts from (one start "
             "model for every seed when it is shared). The **t-interval** is the 95% interval of the mean Δ over "
             "seeds (the spread between trainings); a Δ is **beyond its spread** when that interval excludes 0, and "
             "**|Δ| > sd** when the mean is farther from 0 than one standard deviation over seeds. The pooled "
             "bootstrap resamples questions (and seeds together) and shows the question noise only.", "",
             "| cell | vs | n | Δ per seed | mean Δ ± sd | t-interval (95%) | pooled bootstrap (95%) | beyond its "
             "spread |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        v = versus(grid, c, out)
        if v is None:
            lines.append(f"| `{c.name}` | `{c.vs or c.source}` | 0 | — | — | — | — | — |")
            continue
        ci = "—" if v["t_ci95"] is None else f"[{v['t_ci95'][0]:+.3f}, {v['t_ci95'][1]:+.3f}]"
        sd = "" if v["sd"] is None else f" ± {v['sd']:.3f}"
        verdict = "**yes**" if v["beyond_spread"] else "\\|Δ\\| > sd only" if v["beyond_sd"] else "no"
        lines.append(f"| `{c.name}` | `{c.vs or c.source}` | {len(v['per_seed'])} | " +
                     ", ".join(f"{d:+.3f}" for d in v["per_seed"].values()) + f" | {v['mean']:+.3f}{sd} | {ci} | "
                     f"[{v['pooled_ci95'][0]:+.3f}, {v['pooled_ci95'][1]:+.3f}] | {verdict} |")
    return lines + [""]


def collect(grid: Grid, out: Path) -> dict:
    """Per cell: the eval.json of every finished seed, and the costs."""
    res = {}
    for c in grid.cells:
        evals, costs = [], []
        for seed in c.seeds:
            d = run_dir(out, c, seed)
            if (d / "eval.json").is_file():
                evals.append(json.loads((d / "eval.json").read_text()))
                costs.append(_cost(d))
        res[c.name] = {"evals": evals, "costs": costs}
    return res


def _cell_seconds(cost: dict) -> float:
    return float(cost.get("train_s", 0.0)) + float(cost.get("eval_s", 0.0))


def estimate_cost(grid: Grid, measured: Grid, out: Path) -> dict:
    """Estimated wall time of `grid` from the measured runs of `measured`: each phase of a measured run of the same
    kind is scaled linearly by its own amount of work (setup: held-out pairs x sampled tokens; generation: pairs x
    sampled tokens (model-written rejected) or pairs (teacher-written); training: pair-steps; evaluation: questions x
    new tokens + held-out pairs; recursion: questions x new tokens x calls)."""
    def rcfg(g: Grid, c: Cell, seed: int = 0):
        st = g.stage[c.kind]
        return load_config(RunConfig, ROOT / st["config"], [*st["overrides"], *seed_overrides(c.kind, seed),
                                                            *c.overrides])

    def work(g: Grid, c: Cell) -> dict:
        r = rcfg(g, c)
        tokens = r.sample.max_new_tokens if r.data.rejected_source == "model" else 1
        return {"setup_s": r.data.heldout_pairs * tokens, "gen_s": r.train.iterations * r.data.pairs_per_iteration
                * tokens, "train_s": r.train.iterations * r.train.steps_per_iteration * r.train.batch_size
                * r.train.grad_accum, "finish_s": 1.0, "heldout": r.data.heldout_pairs}

    rates: dict[tuple, list[float]] = {}
    for c in measured.cells:
        for seed in c.seeds:
            d = run_dir(out, c, seed)
            cost = _cost(d)
            if not cost:
                continue
            phases = (training_phases(d) or cost.get("phases")) if c.kind in SCRIPTS else None  # the files, if kept
            if phases:
                w = work(measured, c)
                src = rcfg(measured, c).data.rejected_source
                for ph, secs in phases.items():
                    rates.setdefault((c.kind, src, ph), []).append(secs / max(w[ph], 1e-9))
            if "eval_s" in cost:
                rec = c.kind == "recursion"
                ev = measured.recursion if rec else measured.eval
                units = ev["n_questions"] * ev["max_new_tokens"] * (_calls(c.depth, c.integrate) if rec else 1)
                rates.setdefault(("recursion" if rec else "eval",), []).append(cost["eval_s"] / units)
    rate = {k: sum(v) / len(v) for k, v in rates.items()}

    def get(*key):
        if key in rate:
            return rate[key]
        alt = [v for k, v in rate.items() if k[0] == key[0] and k[-1] == key[-1]]  # same kind and phase
        return sum(alt) / len(alt) if alt else None

    total, missing, per_cell = 0.0, set(), {}
    for c in grid.cells:
        secs = 0.0
        if c.kind in SCRIPTS:
            w, src = work(grid, c), rcfg(grid, c).data.rejected_source
            for ph in ("setup_s", "gen_s", "train_s", "finish_s"):
                r = get(c.kind, src, ph)
                if r is None:
                    missing.add(f"{c.kind}/{ph}")
                else:
                    secs += r * w[ph]
        if c.kind != "recursion":
            secs += (get("eval") or 0.0) * grid.eval["n_questions"] * grid.eval["max_new_tokens"]
        else:
            secs += (get("recursion") or 0.0) * grid.recursion["n_questions"] * grid.recursion["max_new_tokens"] * \
                _calls(c.depth, c.integrate)
        per_cell[c.name] = secs * len(c.seeds)
        total += secs * len(c.seeds)
    return {"total_s": total, "per_cell_s": per_cell, "missing_rates": sorted(missing), "rates": {
        "/".join(map(str, k)): v for k, v in rate.items()}}


def _calls(depth: int | None, integrate: bool | None) -> int:
    return 1 + 3 * ((depth or 1) - 1) + int(bool(integrate))


def write_report(grid: Grid, out: Path, report: Path, command: str) -> str:
    """results/ablations.md (+ PNGs beside it): the table of mean ± std over seeds, commands, costs, machine."""
    data = collect(grid, out)
    machine = next((e["machine"] for v in data.values() for e in v["evals"]), machine_info())
    commits = sorted({e.get("git", "?") for v in data.values() for e in v["evals"]})
    dates = sorted(e.get("date", "") for v in data.values() for e in v["evals"])
    grid_rel = _rel(grid.path)
    lines = [f"# Ablations: `{grid.name}` grid", "",
             grid.description, "",
             f"- command: `{command}`",
             f"- grid: `{grid_rel}`; runs in `{_rel(out)}` (each cell's eval.json, "
             f"{'reasoning.json/.md' if grid.eval['kind'] == 'reasoning' else 'eval.md'}, logs and cost.json)",
             f"- commit(s) of the runs: {', '.join(commits) or '—'}; report written at commit {git_hash()}",
             f"- machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, Python "
             f"{machine.get('python', '?')}; subprocesses with OMP_NUM_THREADS={grid.threads}",
             f"- dates: {dates[0] if dates else '—'} .. {dates[-1] if dates else '—'}", ""]
    # --- cost -----------------------------------------------------------------------------------------------
    measured = sum(_cell_seconds(c) for v in data.values() for c in v["costs"])
    es = _cost(out).get("eval_set_s", 0.0)
    lines += ["## Cost", "",
              f"Measured wall time of this grid: **{(measured + es) / 60:.1f} min** (training + evaluation of "
              f"{sum(len(v['evals']) for v in data.values())} cell-seeds"
              f"{f', eval set {es:.0f} s' if grid.eval['kind'] == 'grounded' else ''}), on the machine "
              "above (see the per-cell column below). The cores may be shared: load average when this report was "
              "written " + "/".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min); every cost scales with it."]
    if grid.estimate:
        try:
            full = load_grid(ROOT / grid.estimate)
            est = estimate_cost(full, grid, out)
            n_train = sum(len(c.seeds) for c in full.cells if c.kind in SCRIPTS)
            lines += ["", f"Estimated wall time of the full grid (`{grid.estimate}`, {len(full.cells)} cells, "
                      f"{n_train} training runs) on the same machine: **{est['total_s'] / 3600:.1f} h**, from this "
                      "grid's measured per-phase rates scaled linearly by each phase's work (sampled tokens, "
                      "pair-steps, evaluated tokens); model loading is scaled too, so it errs high."
                      + (f" No measured rate for {', '.join(est['missing_rates'])} (left out)." if est["missing_rates"]
                         else "")]
        except UserError as e:
            lines += ["", f"(no estimate of {grid.estimate}: {e})"]
    lines += [""]
    # --- tables -----------------------------------------------------------------------------------------------
    axes = list(dict.fromkeys(a for c in grid.cells for a in (c.axes or [c.kind])))
    reasoning = grid.eval["kind"] == "reasoning"
    names = REASONING_METRICS if reasoning else TABLE_METRICS
    cols = list(names)
    lines += ["## Results (mean ± std over seeds; n = seeds)", ""]
    if reasoning:
        lines += [f"Greedy answers to the fixed held-out set of `tasks.answer_set` ({grid.eval['n_questions']} "
                  f"questions of held-out concepts, gold answers from the knowledge graph, "
                  f"{grid.eval['max_new_tokens']} new tokens), graded by `eval_reasoning.py`: the same questions for "
                  "every cell, so the Δ column is a paired comparison with the model the cell starts from. The "
                  "spread over seeds (±) is the training's; the brackets are each seed's bootstrap interval over "
                  "questions. Each row is reproduced by its command (same grid file and commit). A row marked "
                  "**stale** was computed with a config that has changed since (`--only CELL --force` recomputes "
                  "it).", ""]
    else:
        lines += ["Generations are greedy on one shared question set (`eval_set.jsonl`, grounded teacher; "
              f"{grid.eval['n_questions']} questions, {grid.eval['max_new_tokens']} new tokens; recursion cells "
              f"{grid.recursion['n_questions']} questions, {grid.recursion['max_new_tokens']} new tokens per call). "
              "Reward metrics, `logp acc` and `NLL chosen` are on each run's own held-out pairs (made like its "
              "training pairs, e.g. stage-1 rejected = the model's direct answer, stage-2 rejected = its own thinking "
              "answer), rewards with the run's own loss: compare them within an axis, not across stages. "
              "Each row is reproduced by its command (same grid file and commit; a fresh `--out` or `--force`); "
              "tok/s and costs are timings of this machine. A row marked **stale** was computed with a config that "
              "has changed since (`--only CELL --force` recomputes it).", ""]
    for ax in axes:
        cells = [c for c in grid.cells if ax in (c.axes or [c.kind])]
        head = " | ".join(names[k] for k in cols)
        lines += [f"### {ax}", "", f"| cell | n | {head} | cost (min) | command |",
                  "|---|---|" + "---|" * len(cols) + "---|---|"]
        for c in cells:
            v = data[c.name]
            stale = any(stale_keys(grid, c, seed, out) for seed in c.seeds)
            row = [f"`{c.name}`" + (f" ({c.label})" if c.label else "") + (" **stale**" if stale else ""),
                   str(len(v["evals"]))]
            for k in cols:
                mean, std = _stats([e["metrics"].get(k) for e in v["evals"]])
                nd = 1 if k in ("answer_words", "tokens_per_s") else 3
                txt = "—" if mean is None else f"{'+' if k == 'delta' and mean >= 0 else ''}{mean:.{nd}f}" + (
                    f" ± {std:.{nd}f}" if std is not None else "")
                cis = [e["metrics"][f"{k}_ci95"] for e in v["evals"] if e["metrics"].get(f"{k}_ci95")]
                row.append(txt + "".join(f" [{lo:.3f}, {hi:.3f}]" for lo, hi in cis))
            secs = [_cell_seconds(x) for x in v["costs"]]
            row.append(f"{sum(secs) / len(secs) / 60:.1f}" if secs else "—")
            row.append(f"`python ablations.py --grid {grid_rel} --only {c.name}`")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    doc = {**METRIC_DOC, **REASONING_DOC} if reasoning else METRIC_DOC
    lines += ["Metrics: " + "; ".join(f"**{names[k]}** = {doc.get(k, k)}" for k in cols) + ".", ""]
    lines += versus_lines(grid, out)
    # --- plots ------------------------------------------------------------------------------------------------
    pngs = plot_report(grid, data, report.parent, report.stem)
    lines += [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    # --- exact commands -----------------------------------------------------------------------------------------
    lines += ["## Exact commands per cell and seed", "",
              "What `--only CELL` runs (working directory: the repository root; environment OMP_NUM_THREADS="
              f"{grid.threads}):", ""]
    if grid.eval["kind"] == "reasoning":
        lines.append(f"- questions: the first {grid.eval['n_questions']} of `tasks.answer_set` (built in "
                     "eval_reasoning.py; nothing to generate)")
    else:
        lines.append("- eval set: " + (f"`{_rel(grid.eval_set(out))}` (given)" if grid.eval['eval_set'].get('file')
                                       else f"`{_show(eval_set_command(grid, out))}`"))
    for c in grid.cells:
        for seed in c.seeds:
            cmds = []
            if c.kind in SCRIPTS:
                cmds.append(_show(train_command(grid, c, seed, out)))
            cmds.append(_show(recursion_command(grid, c, seed, out) if c.kind == "recursion" else
                              eval_command(grid, c, seed, out)))
            ev = run_dir(out, c, seed) / "eval.json"
            commit = json.loads(ev.read_text()).get("git", "?") if ev.is_file() else "not run"
            lines.append(f"- `{c.name}` seed {seed} ({commit}): " + " && ".join(f"`{x}`" for x in cmds) +
                         (f" (the model of `{c.path}`, trained outside the grid)" if c.kind == "model" else ""))
    text = "\n".join(lines) + "\n"
    atomic_write_text(report, text)
    return text


def plot_report(grid: Grid, data: dict, folder: Path, stem: str) -> list[Path]:
    """<stem>.png: answer-quality and preference metrics per cell with seed spread; <stem>_recursion.png: answer
    quality against recursion depth, with and without integration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    cells = [c for c in grid.cells if c.kind != "recursion" and data[c.name]["evals"]]
    if cells:
        reasoning = grid.eval["kind"] == "reasoning"
        names_of = REASONING_METRICS if reasoning else TABLE_METRICS
        keys = (["exact_accuracy", "format_rate", "truncated_rate", "factuality"] if reasoning else
                ["format_rate", "token_f1", "rouge_l", "concept_recall", "logps/accuracies", "nll"])
        fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 0.32 * len(cells) + 1.6), sharey=True)
        names = [c.name for c in cells]
        for ax, k in zip(axes, keys):
            st = [_stats([e["metrics"].get(k) for e in data[n]["evals"]]) for n in names]
            err = [s or 0 for _, s in st]
            if reasoning and k == "exact_accuracy":  # the span of the seeds' bootstrap intervals
                cis = [[e["metrics"]["exact_accuracy_ci95"] for e in data[n]["evals"]] for n in names]
                err = [[m - min(lo for lo, _ in c) for (m, _), c in zip(st, cis)],
                       [max(hi for _, hi in c) - m for (m, _), c in zip(st, cis)]]
            ax.barh(range(len(names)), [m or 0 for m, _ in st], xerr=err, color="tab:blue", alpha=0.8, capsize=2)
            ax.set_title(names_of[k] + (" (95% CI)" if reasoning and k == "exact_accuracy" else ""), fontsize=9)
            if k != "nll":
                ax.set_xlim(0, 1)  # rates
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, axis="x")
        axes[0].set_yticks(range(len(names)))
        axes[0].set_yticklabels(names, fontsize=7)
        axes[0].invert_yaxis()
        fig.tight_layout()
        written.append(save_png(fig, folder / f"{stem}.png"))
        plt.close(fig)
    rec = [c for c in grid.cells if c.kind == "recursion" and data[c.name]["evals"]]
    if rec:
        keys = ["token_f1", "rouge_l", "concept_recall", "answer_words"]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
        for ax, k in zip(axes, keys):
            for integ, style in ((False, "o-"), (True, "s--")):
                pts = sorted((c.depth, _stats([e["metrics"].get(k) for e in data[c.name]["evals"]])[0])
                             for c in rec if c.integrate == integ)
                pts = [(d, m) for d, m in pts if m is not None]
                if pts:
                    ax.plot([d for d, _ in pts], [m for _, m in pts], style,
                            label="integration" if integ else "last answer")
            ax.set_title(TABLE_METRICS[k], fontsize=9)
            ax.set_xlabel("rounds N", fontsize=8)
            ax.set_xticks(sorted({c.depth for c in rec}))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        written.append(save_png(fig, folder / f"{stem}_recursion.png"))
        plt.close(fig)
    return written


# -- CLI ---------------------------------------------------------------------------------------------------------------

def _recursion_main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python ablations.py recursion",
                                 description="Recursive-reasoning sweep of one run (inference-time ablation).")
    ap.add_argument("run", help="run directory whose final/model answers")
    ap.add_argument("--questions", required=True, help="JSONL of held-out pairs (questions + grounded answers)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--critic", default="smollm2-135m-instruct")
    ap.add_argument("--depths", default="1,2,3")
    ap.add_argument("--integrate", default="no,yes", help="no, yes or no,yes")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        depths = [int(x) for x in a.depths.split(",")]
        integ = [{"no": False, "yes": True}[x] for x in a.integrate.split(",")]
    except (ValueError, KeyError):
        raise UserError(f"--depths takes integers like 1,2,3 and --integrate no/yes (got {a.depths!r}, "
                        f"{a.integrate!r})") from None
    if min(depths) < 1:
        raise UserError("--depths must be >= 1")
    cmd = "python ablations.py recursion " + " ".join(argv)
    res = recursion_sweep(a.run, a.questions, a.n, a.max_new_tokens, a.critic, depths, integ, a.out, cmd)
    print(json.dumps({k: {m: (round(x, 4) if isinstance(x, float) else x) for m, x in v["metrics"].items()}
                      for k, v in res["variants"].items()}))
    return res


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "recursion":
        return _recursion_main(argv[1:])
    ap = argparse.ArgumentParser(description="Run an ablation grid (resumable) and regenerate its report.")
    ap.add_argument("--grid", default="configs/ablations/reduced.yaml")
    ap.add_argument("--out", help="where the runs go (default runs/ablations/<grid name>)")
    ap.add_argument("--report", help="the markdown report, PNGs beside it (default results/ablations.md for the "
                    "reduced grid, results/ablations_<name>.md for others)")
    ap.add_argument("--only", nargs="+", help="run only these cells (and the cells they start from)")
    ap.add_argument("--force", action="store_true", help="delete and rerun the --only cells (all cells without --only)")
    ap.add_argument("--report-only", action="store_true", help="regenerate the report from finished cells")
    a = ap.parse_args(argv)
    grid = load_grid(a.grid)
    out = Path(a.out) if a.out else ROOT / "runs" / "ablations" / grid.name
    report = Path(a.report) if a.report else ROOT / "results" / ("ablations.md" if grid.name == "reduced" else
                                                                 f"ablations_{grid.name}.md")
    cmd = f"python ablations.py --grid {a.grid}" + (f" --out {a.out}" if a.out else "") + \
        (f" --report {a.report}" if a.report else "")
    t0 = time.perf_counter()
    status = {} if a.report_only else run_grid(grid, out, a.only, a.force)
    write_report(grid, out, report, cmd)
    failed = {k: v for k, v in status.items() if any(s in ("failed", "blocked") for s in v)}
    print(json.dumps({"status": status, "report": str(report), "minutes": round((time.perf_counter() - t0) / 60, 2)}))
    if failed:
        print(f"error: cells did not finish: {', '.join(failed)} (see their train.log / eval.log)", file=sys.stderr)
        sys.exit(1)
    return status


if __name__ == "__main__":
    main()
