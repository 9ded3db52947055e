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
from safetensors.torch import load_file, save_file

from preflexor.errors import UserError
from preflexor.utils import atomic_dir, atomic_write_json


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, state: dict, keep_last: int) -> Path:
    """Write `ckpt_root/step_N/` atomically: trainable tensors (LoRA + new-token rows), optimizer state, RNG states
    and the loop state (iteration, data position, ...). The last `keep_last` checkpoints are kept."""
    path = ckpt_root / f"step_{step}"
    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "state.json", {**state, "step": step, "python_random": _py_random_state()})
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


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore trainable tensors, optimizer, RNG and loop state from a checkpoint directory (no pickle: safetensors,
    and `torch.load(weights_only=True)` for the optimizer state)."""
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
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    v, internal, gauss = state.pop("python_random")
    random.setstate((v, tuple(internal), gauss))
    return state


def resume_point(ckpt_root: Path, resume: str, model, optimizer, verbose: bool = True) -> tuple[dict, Path | None]:
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
        state.update(load_checkpoint(path, model, optimizer))
        if verbose:
            print(f"resumed from {path} (step {state['global_step']})")
    return state, path
