"""Where a run computes: device and dtype resolved once, a `torchrun` process group, seeding, and the collectives.

`setup_runtime` reads the config's device/dtype (env PREFLEXOR_DEVICE overrides the device), joins a `torchrun`
group when launched under one (gloo on the CPU, nccl on CUDA), and prints what it chose and why.
"""
from __future__ import annotations

import ctypes
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from preflexor.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # dtype of the frozen base weights
    autocast: torch.dtype | None  # bf16 autocast on CUDA, None on CPU (fp32)
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast_ctx(self):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)


def keep_freed_memory() -> bool:
    """On the CPU with glibc: keep freed memory in the heap for the next step instead of handing it back to the kernel.

    glibc returns large freed blocks (mmap'ed above a threshold, or trimmed off the heap top), so every training step
    would page-fault its activations in afresh (bench/RESULTS_train.md). Raising both thresholds to 1 GiB keeps them;
    the process's RSS then stays at its peak, as with PyTorch's caching allocator on CUDA. Skipped (False) without
    glibc, or when the user set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (glibc's own switches)."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def resolve_device(device: str = "auto", dtype: str = "auto",
                   key: str = "train.device") -> tuple[torch.device, torch.dtype, str]:
    """(device, base-weight dtype, why) for config values "auto"/"cpu"/"cuda" and "auto"/"float32"/"bfloat16"/
    "float16": auto = CUDA with bf16 when available, else the CPU with fp32. PREFLEXOR_DEVICE overrides `device`."""
    device = os.environ.get("PREFLEXOR_DEVICE", device)
    why = "configured"
    if device == "auto":
        device, why = ("cuda", "CUDA available") if torch.cuda.is_available() else ("cpu", "no CUDA device")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}=cuda but no CUDA device is available (use auto or cpu)")
    if dtype == "auto":
        base = torch.bfloat16 if device == "cuda" else torch.float32
    elif dtype in DTYPES:
        base = DTYPES[dtype]
    else:
        raise UserError(f"model.dtype: unknown dtype {dtype!r} (auto, {', '.join(DTYPES)})")
    return torch.device(device), base, why


def setup_runtime(device: str = "auto", dtype: str = "auto", verbose: bool = True,
                  timeout_s: float = 1800.0) -> Runtime:
    """Resolve device and precision once and join a `torchrun` group if launched under one (gloo on the CPU, nccl on
    CUDA, `timeout_s` for its collectives: `train.dist_timeout_s`). Prints the choice.

    On CUDA every rank uses `cuda:LOCAL_RANK` (0 without torchrun: `set_device` needs an index), and float32 matmuls
    may use TF32 (the bf16 autocast GEMMs are unaffected; fp32 ones, e.g. the loss head of an fp32 model, get
    tensor cores)."""
    dev, base, why = resolve_device(device, dtype)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    rt = Runtime(dev, base, torch.bfloat16 if dev.type == "cuda" else None, rank, world)
    if verbose and rt.main:
        prec = "bf16 autocast" if rt.autocast else "fp32"
        print(f"device: {dev} ({why}), base weights {str(base).removeprefix('torch.')}, {prec}, world size {world}")
    return rt


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients across ranks (data parallel). LoRA gradients are small, so one flat all-reduce is cheap and
    keeps the synchronisation visible; it also covers parameters used outside `forward` (the head weight)."""
    if world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def all_reduce_mean(x: float, rt: Runtime) -> float:
    """The mean of `x` over ranks; the tensor lives on the run's device (nccl reduces CUDA tensors only)."""
    if rt.world <= 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return float(t.item() / rt.world)


def shard_map(fn, items: list, rt: Runtime) -> list:
    """`fn(items)` with the work shared by ranks: rank r runs `fn(items[r::world])` (a list, one result per item),
    and every rank gets all results back in item order (a collective under torchrun: every rank calls it)."""
    mine = fn(items[rt.rank::rt.world]) if items[rt.rank::rt.world] else []
    if rt.world == 1:
        return mine
    parts = [None] * rt.world
    dist.all_gather_object(parts, mine)
    out = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::rt.world] = part
    return out
