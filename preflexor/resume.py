"""Training-resume checkpoints (`runs/<name>/checkpoints/step_N/`): the trainable tensors, the optimizer, every RNG
and the loop position, written atomically, so an interrupted run continues bit-identically. Model loading and HF
export are checkpoint.py; adapter files are peft_io.py.

A resume is checked before the run directory is touched (`resume_point`): the checkpoint must be whole, match the
model, and have been trained with the same settings (`changed_settings`); `tidy_run_dir` then makes the directory
agree with it, and `start_state` applies its weights and RNG states where the loop begins.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from preflexor import fsdp
from preflexor.errors import UserError
from preflexor.utils import atomic_dir, atomic_write_json

FILES = ("trainable.safetensors", "optimizer.pt", "rng.safetensors", "state.json")
LOOP_KEYS = ("step", "iteration", "step_in_iteration", "global_step", "position")  # in every state.json
# Settings a resume may change without asking: where the run writes, how often it saves, logs and evaluates (the
# evaluation runs in eval mode and draws no random numbers), the speed paths and sharding (same maths, other
# rounding). Any other change alters what the optimizer does next (train.iterations only lengthens the run under
# the constant schedule: see changed_settings).
FREE_KEYS = frozenset({
    "model.fast", "model.gradient_checkpointing", "train.fsdp", "train.out_dir", "train.device", "train.dist_timeout_s",
    "train.resume", "train.allow_resume_changes", "train.eval_every", "train.save_every", "train.keep_last",
    "train.log_every", "train.eval_generations", "train.eval_max_new_tokens", "train.eval_answers",
    "train.eval_answer_tokens", "train.save_merged"})
_STEP = re.compile(r"step_(\d+)")
# what a kill leaves of our own atomic writes: atomic_dir's `.step_N.<random>.tmp` and `.step_N.old` under
# checkpoints/ (and `.adapter.*`, `.model.*` under final/), atomic_write's `.<file>.<random>.tmp` beside the run's files
_STALE_CKPT = re.compile(r"\.step_\d+\.(\w+\.tmp|old)")
_STALE_FINAL = re.compile(r"\.(adapter|model)\.(\w+\.tmp|old)")
_STALE_RUN = re.compile(r"\.(config\.json|metrics\.jsonl|summary\.json|curves\.png)\.\w+\.tmp")


def snapshot(model, optimizer) -> dict:
    """What a checkpoint holds of the model and optimizer: the trainable tensors and the optimizer state, whole (a
    collective under FSDP, where every rank calls it: the state is then keyed by parameter name, fsdp.py)."""
    if fsdp.sharded(model):
        return {"trainable": fsdp.full_state(model), "optimizer": fsdp.optimizer_state(model, optimizer)}
    return {"trainable": {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict()}


def rng_states(rt) -> list[dict]:
    """Every rank's RNG states, in rank order (a collective under torchrun: every rank calls it): torch's CPU
    generator, this rank's CUDA generator, Python's `random`."""
    own = {"torch_cpu": torch.get_rng_state(), "python": _py_random_state()}
    if rt.device.type == "cuda":
        own["torch_cuda"] = torch.cuda.get_rng_state(rt.device)
    if rt.world == 1:
        return [own]
    out = [None] * rt.world
    dist.all_gather_object(out, own)
    return out


def save_checkpoint(ckpt_root: Path, step: int, snap: dict, state: dict, keep_last: int,
                    rng: list[dict], config: dict | None = None) -> Path:
    """Write `ckpt_root/step_N/` atomically: trainable tensors (LoRA + new-token rows) and optimizer state
    (`snapshot`), every rank's RNG states (`rng_states`), the loop state (iteration, data position, ...) and the run config it was
    trained with (`to_dict`: what a resume is compared against). The last `keep_last` checkpoints are kept."""
    path = ckpt_root / f"step_{step}"
    with atomic_dir(path) as tmp:
        save_file(snap["trainable"], str(tmp / "trainable.safetensors"))
        torch.save(snap["optimizer"], tmp / "optimizer.pt")
        save_file({f"rank{r}.{k}": v for r, states in enumerate(rng) for k, v in states.items() if k != "python"},
                  str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "state.json", {**state, "step": step, "python_random": [x["python"] for x in rng],
                                               **({"config": config} if config is not None else {})})
    steps = checkpoints(ckpt_root)
    for _, old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _py_random_state():
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(N, path) of the `step_N` directories under `ckpt_root`, oldest first (complete or not)."""
    return sorted((int(m.group(1)), p) for p in ckpt_root.glob("step_*")
                  if (m := _STEP.fullmatch(p.name)) and p.is_dir())


# -- reading and checking ------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A checkpoint read whole and checked (`read_checkpoint`), not yet applied to a model."""
    path: Path
    tensors: dict[str, torch.Tensor]  # the trainable parameters by name
    optimizer: dict
    rng: dict[str, torch.Tensor]  # rank{r}.torch_cpu / rank{r}.torch_cuda
    python_random: list  # one [version, internal, gauss] per rank
    state: dict  # the loop state: iteration, step_in_iteration, global_step, position (+ what the scripts added)
    config: dict | None  # the run config it was trained with (None: a checkpoint older than that record)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint directory and check that it is whole: every file there and readable, state.json an object
    with the loop position, one loadable RNG state per rank; else a one-line `UserError` naming the directory. No
    pickle: safetensors, and `torch.load(weights_only=True)` for the optimizer state."""
    missing = [n for n in FILES if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = load_file(str(path / "rng.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except Exception as e:  # corrupt files: one line naming the checkpoint
        raise UserError(f"{path}: corrupt checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    _check_state(path / "state.json", state)
    py = state.pop("python_random")
    if "torch_cpu" in rng:  # written before checkpoints kept every rank's states
        rng, py = {"rank0.torch_cpu": rng["torch_cpu"]}, [py]
    _check_rng(path, rng, py)
    return Checkpoint(path, tensors, opt_state, rng, py, state, state.pop("config", None))


def _check_state(where: Path, state) -> None:
    if not isinstance(state, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(state).__name__}")
    missing = [k for k in (*LOOP_KEYS, "python_random") if k not in state]
    if missing:
        raise UserError(f"{where}: missing key{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
    for k in LOOP_KEYS:
        if not isinstance(state[k], int) or isinstance(state[k], bool) or state[k] < 0:
            raise UserError(f"{where}: '{k}' must be an integer >= 0, got {state[k]!r}")
    for k, tp in (("python_random", list), ("config", dict), ("last_eval", dict)):
        if k in state and not isinstance(state[k], tp):
            raise UserError(f"{where}: '{k}' must be a JSON {'array' if tp is list else 'object'}, "
                            f"got {type(state[k]).__name__}")


def _check_rng(path: Path, rng: dict, py: list) -> None:
    """One torch and one Python state per rank, each loadable (tried on scratch generators: the run's own RNG is
    restored later, by `start_state`)."""
    ranks = [k for k in rng if k.endswith(".torch_cpu")]
    if "rank0.torch_cpu" not in rng or len(ranks) != len(py):
        raise UserError(f"{path}: RNG states do not match ({len(ranks)} torch, {len(py)} Python)")
    try:
        for k in ranks:
            torch.Generator().set_state(rng[k])
        for v, internal, gauss in py:
            random.Random().setstate((v, tuple(internal), gauss))
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: corrupt RNG state ({str(e).splitlines()[0][:120]})") from None


def _check_model(ckpt: Checkpoint, model) -> None:
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(ckpt.tensors) != trainable:
        diff = sorted(set(ckpt.tensors) ^ trainable)[:3]
        raise UserError(f"{ckpt.path}: checkpoint does not match the model's trainable parameters (e.g. {diff})")
    for n, t in ckpt.tensors.items():
        if params[n].shape != t.shape:
            raise UserError(f"{ckpt.path}: shape mismatch for {n}: {tuple(t.shape)} vs model {tuple(params[n].shape)}")


def _flat(config: dict) -> dict:
    """{"train.lr": 5e-5, ...} from a `to_dict` config (sections only: config.json's git hash and stage are not
    settings)."""
    return {f"{sec}.{k}": v for sec, vals in config.items() if isinstance(vals, dict) for k, v in vals.items()}


def changed_settings(recorded: dict, config: dict) -> list[str]:
    """`key old -> new` for each setting of `config` (this command's, `to_dict`) that differs from `recorded` (the
    checkpoint's), FREE_KEYS aside. `train.iterations` is free under the constant schedule (more iterations just
    lengthen the run); under cosine the total sets the learning rate of every step. A whole section the checkpoint
    does not record (one added since, e.g. `rl` for a stage-1 run) is not a change."""
    old, new = _flat(recorded), _flat(json.loads(json.dumps(config)))  # JSON's types on both sides (tuple -> list)
    free = FREE_KEYS | ({"train.iterations"} if new.get("train.schedule") == "constant" else set())
    free |= {k for k in new if k.split(".")[0] not in recorded}
    show = lambda k, d: json.dumps(d[k]) if k in d else "unset"  # noqa: E731
    return [f"{k} {show(k, old)} -> {show(k, new)}" for k in dict.fromkeys([*new, *old])
            if k not in free and (k in old, old.get(k)) != (k in new, new.get(k))]


def _recorded_config(ckpt: Checkpoint) -> dict | None:
    """The config the checkpoint was trained with; for one older than that record, its run's config.json (not yet
    rewritten: the scripts write it only after this check)."""
    if ckpt.config is not None:
        return ckpt.config
    try:
        cfg = json.loads((ckpt.path.parent.parent / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def resume_point(ckpt_root: Path, resume: str, model, optimizer, config: dict, allow_changes: bool = False,
                 main: bool = True) -> Checkpoint | None:
    """The checkpoint to resume from, checked before anything is written into the run directory. `train.resume` =
    auto: the newest complete checkpoint under `ckpt_root` (a newer incomplete or corrupt one, e.g. from a kill during
    its write, is skipped with one line), None if there is none; never: None; else a checkpoint directory, which must
    be complete. Its trainable tensors must match the model's, and every setting that changes the optimisation must
    equal the one it was trained with (`changed_settings`) unless `allow_changes` (then one line lists them).
    Loads the optimizer state (the optimizer first steps in the loop); `start_state` applies the rest later."""
    if resume in ("never", ""):
        return None
    if resume == "auto":
        ckpt = None
        for _, path in reversed(checkpoints(ckpt_root)):
            try:
                ckpt = read_checkpoint(path)
                break
            except UserError as e:
                if main:
                    print(f"resume: skipped {e}")
        if ckpt is None:
            return None
    else:
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"train.resume: checkpoint directory {path} not found")
        ckpt = read_checkpoint(path)
    recorded = _recorded_config(ckpt)
    changes = changed_settings(recorded, config) if recorded is not None else []
    if changes and not allow_changes:
        raise UserError(f"{ckpt.path}: trained with other settings ({', '.join(changes)}); rerun with the same ones, "
                        f"add train.allow_resume_changes=true to continue with the new ones, or "
                        f"train.resume=never to start over")
    if changes and main:
        print(f"resume: continuing with changed settings (train.allow_resume_changes): {', '.join(changes)}")
    _check_model(ckpt, model)  # after the settings: "lora.r 4 -> 8" says more than a shape
    by_name = all(isinstance(i, str) for g in ckpt.optimizer.get("param_groups", []) for i in g.get("params", []))
    if fsdp.sharded(model) and not by_name:
        raise UserError(f"{ckpt.path}: written by a run without FSDP; resume it with train.fsdp=false")
    try:
        if by_name:  # written under FSDP (fsdp.optimizer_state): loads into any world size, sharded or not
            fsdp.load_optimizer_state(model, optimizer, ckpt.optimizer)
        else:
            optimizer.load_state_dict(ckpt.optimizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{ckpt.path}: optimizer state does not match this run's parameter groups "
                        f"({str(e).splitlines()[0][:120]})") from None
    return ckpt


# -- applying ------------------------------------------------------------------------------------------------------

def tidy_run_dir(out_dir: Path, ckpt: Checkpoint | None, metrics) -> None:
    """Make the run directory agree with the resume point (main rank, once the command is known to be valid): delete
    what a kill left of our own atomic writes (`_STALE_*`: nothing else) and the checkpoints after the resume point
    (incomplete ones `resume_point` skipped, or those of an attempt this run rewinds: a later resume must not jump
    to them, nor `keep_last` keep them instead of this run's), and cut `metrics` back to the checkpoint's step, since
    the steps after it are trained and logged again (a fresh run starts a fresh log and a fresh checkpoints/).

    A stale `.step_N.old` is safe to delete even when `step_N` is missing (a kill between atomic_dir's two renames):
    both it and the `.step_N.*.tmp` beside it are step N, which this run recomputes from an earlier checkpoint (the
    one it resumed from when it wrote step N is still there: older ones are pruned only after a save completes).
    In final/, `.model.old` is kept while `model` is missing: it is the only copy until this run saves its own."""
    final = out_dir / "final"
    for d, pattern in ((out_dir / "checkpoints", _STALE_CKPT), (final, _STALE_FINAL), (out_dir, _STALE_RUN)):
        for p in d.glob(".*") if d.is_dir() else []:
            m = pattern.fullmatch(p.name)
            only_copy = pattern is _STALE_FINAL and m and m.group(2) == "old" and not (final / m.group(1)).exists()
            if m and not only_copy:
                _remove(p)
    step = ckpt.state["global_step"] if ckpt is not None else 0
    later = [p for n, p in checkpoints(out_dir / "checkpoints") if n > step]
    for p in later:
        _remove(p)
    if later:
        print(f"{out_dir / 'checkpoints'}: removed {', '.join(p.name for p in later)} (after the resume point, "
              f"step {step})")
    if ckpt is None:
        metrics.path.unlink(missing_ok=True)
        return
    dropped = metrics.truncate(step)
    if dropped:
        print(f"{metrics.path}: dropped {dropped} line{'s' * (dropped > 1)} written after step {step} (logged again)")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def start_state(ckpt: Checkpoint | None, model, rt) -> dict:
    """The loop state to start from: step 0 without a checkpoint; with one, its loop state, its trainable tensors
    copied into the model, and this rank's RNG states restored (rank 0's when it has none for this rank)."""
    state = {"iteration": 0, "step_in_iteration": 0, "global_step": 0, "position": 0}
    if ckpt is None:
        return state
    params = dict(model.named_parameters())
    for n, t in ckpt.tensors.items():
        fsdp.load_trainable(params[n], t)  # into this rank's shard under FSDP
    r = rt.rank if f"rank{rt.rank}.torch_cpu" in ckpt.rng else 0
    torch.set_rng_state(ckpt.rng[f"rank{r}.torch_cpu"])
    if rt.device.type == "cuda" and f"rank{r}.torch_cuda" in ckpt.rng:
        torch.cuda.set_rng_state(ckpt.rng[f"rank{r}.torch_cuda"], rt.device)
    v, internal, gauss = ckpt.python_random[r]
    random.setstate((v, tuple(internal), gauss))
    if rt.main:
        print(f"resumed from {ckpt.path} (step {ckpt.state['global_step']})")
    return {**state, **ckpt.state}
