"""Training-resume checkpoints (`runs/<name>/checkpoints/step_N/`): the trainable tensors, the optimizer, every RNG
and the loop position, written atomically, so an interrupted run continues bit-identically. Model loading and HF
export are checkpoint.py; adapter files are peft_io.py.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from preflexor.errors import UserError
from preflexor.utils import atomic_dir, atomic_write_json


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


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


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, state: dict, keep_last: int,
                    rng: list[dict]) -> Path:
    """Write `ckpt_root/step_N/` atomically: trainable tensors (LoRA + new-token rows), optimizer state, every
    rank's RNG states (`rng_states`) and the loop state (iteration, data position, ...). The last `keep_last`
    checkpoints are kept."""
    path = ckpt_root / f"step_{step}"
    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file({f"rank{r}.{k}": v for r, states in enumerate(rng) for k, v in states.items() if k != "python"},
                  str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "state.json", {**state, "step": step, "python_random": [x["python"] for x in rng]})
    steps = sorted((int(m.group(1)), p) for p in ckpt_root.glob("step_*") if (m := re.fullmatch(r"step_(\d+)", p.name)))
    for _, old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _py_random_state():
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in ckpt_root.glob("step_*") if (m := re.fullmatch(r"step_(\d+)", p.name))]
    return max(steps)[1] if steps else None


def load_checkpoint(path: Path, model, optimizer, rank: int = 0, device: torch.device | None = None) -> dict:
    """Restore trainable tensors, optimizer, this rank's RNG states (rank 0's when the checkpoint has none for it)
    and the loop state from a checkpoint directory (no pickle: safetensors, and `torch.load(weights_only=True)` for
    the optimizer state)."""
    need = ["trainable.safetensors", "optimizer.pt", "rng.safetensors", "state.json"]
    missing = [n for n in need if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = load_file(str(path / "rng.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except Exception as e:  # corrupt files: one line naming the checkpoint
        raise UserError(f"{path}: corrupt checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != trainable:
        diff = sorted(set(tensors) ^ trainable)[:3]
        raise UserError(f"{path}: checkpoint does not match the model's trainable parameters (e.g. {diff})")
    with torch.no_grad():
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                raise UserError(f"{path}: shape mismatch for {n}: {tuple(t.shape)} vs model {tuple(params[n].shape)}")
            params[n].copy_(t)
    optimizer.load_state_dict(opt_state)
    py = state.pop("python_random")
    if "torch_cpu" in rng:  # written before checkpoints kept every rank's states
        rng, py = {"rank0.torch_cpu": rng["torch_cpu"]}, [py]
    r = rank if f"rank{rank}.torch_cpu" in rng else 0
    torch.set_rng_state(rng[f"rank{r}.torch_cpu"])
    if device is not None and device.type == "cuda" and f"rank{r}.torch_cuda" in rng:
        torch.cuda.set_rng_state(rng[f"rank{r}.torch_cuda"], device)
    v, internal, gauss = py[r]
    random.setstate((v, tuple(internal), gauss))
    return state


def resume_point(ckpt_root: Path, resume: str, model, optimizer, rt) -> tuple[dict, Path | None]:
    """The loop state to start from and the checkpoint it came from: `train.resume` = auto (the newest checkpoint
    under `ckpt_root`, if any), never, or a checkpoint directory. Restores model, optimizer and RNG states."""
    state = {"iteration": 0, "step_in_iteration": 0, "global_step": 0, "position": 0}
    path = None
    if resume == "auto":
        path = latest_checkpoint(ckpt_root)
    elif resume not in ("never", ""):
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"train.resume: checkpoint directory {path} not found")
    if path is not None:
        state.update(load_checkpoint(path, model, optimizer, rt.rank, rt.device))
        if rt.main:
            print(f"resumed from {path} (step {state['global_step']})")
    return state, path
