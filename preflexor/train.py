"""Training-loop pieces shared by stage 1 (ORPO) and stage 2 (EXO/DPO/IPO).

Device and distributed setup, AdamW and schedules, the preference step (one forward over chosen+rejected, the fused
chunked log-probs, a loss from `losses.py`), the adapter-disabled reference, atomic checkpoints with full resume
state, metrics as JSONL with PNG plots, and the held-out evaluation. The scripts (`train_orpo.py`, `train_dpo.py`)
call these in the order they read: config, device, data, model, optimizer, loop, save.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import random
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from preflexor.errors import UserError
from preflexor.logprobs import sequence_logps, token_logps
from preflexor.losses import LossSpec
from preflexor.model import SharedPrompt
from preflexor.utils import append_jsonl, atomic_dir, atomic_write_json, save_png

SHARE_PROMPT_ENV = "PREFLEXOR_SHARE_PROMPT"  # "0": one forward per half of the batch (for A/B timing)
MERGE_SLACK = 1.15  # chosen and rejected answers run as one block when padding adds at most 15% positions

# -- device, precision, distributed ------------------------------------------------------------------------------


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
    page-faults its activations in afresh: ~150k faults and 0.3-0.4 s of kernel time per step of bench_train.py's
    ORPO step (0.03 s after; peak RSS +2%). Raising both thresholds to 1 GiB keeps them; the process's RSS then stays
    at its peak, as with PyTorch's own caching allocator on CUDA. Skipped (False) without glibc, or when the user set
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (glibc's own switches) themselves."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def setup_runtime(device: str = "auto", dtype: str = "auto", verbose: bool = True) -> Runtime:
    """Resolve device and precision once (env PREFLEXOR_DEVICE overrides), and join a `torchrun` group if launched
    under one (gloo on CPU, nccl on CUDA). Prints the choice and why."""
    device = os.environ.get("PREFLEXOR_DEVICE", device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        why = "CUDA available" if device == "cuda" else "no CUDA device"
    else:
        why = "configured"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available (use train.device=auto or cpu)")
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" and world > 1 else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        keep_freed_memory()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dtype == "auto":
        base = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        base = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if base is None:
            raise UserError(f"model.dtype: unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
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
    if rt.world <= 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / rt.world)


# -- optimizer and schedule --------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                    new_rows_lr: float | None = None):
    """AdamW over the trainable parameters (fused, on CUDA and the CPU); no weight decay on norms, biases and other
    1-D tensors.

    The trained rows of new tokens get no decay either, and their own learning rate `new_rows_lr` (None = `lr`): they
    start at the mean embedding, so through the tied head a new token's logit starts some 20 nats below the likely
    next tokens, and Adam moves a logit by about lr * |h|_1 per step (0.5 nats at lr 5e-4 for SmolLM2's final hidden
    states), so at the LoRA's rate the model needs ~40 steps before it can open with `<|thinking|>` at all."""
    decay, no_decay, rows = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if name.endswith("new_rows"):
                rows.append(p)
            else:
                (no_decay if p.ndim < 2 or name.endswith("bias") else decay).append(p)
    if not decay and not no_decay and not rows:
        raise UserError("no trainable parameters (check lora.targets and lora.r)")
    rows_scale = 1.0 if new_rows_lr is None else new_rows_lr / lr
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": rows, "weight_decay": 0.0, "lr_scale": rows_scale, "lr": lr * rows_scale}]
    # fused: one kernel over all tensors (on the CPU 20 ms per step for SmolLM2's 4.9M LoRA parameters in 420
    # tensors, against 135 ms for the multi-tensor "foreach" path)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type in ("cuda", "cpu"))


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise UserError(f"train.schedule: unknown schedule {schedule!r} (constant, cosine)")


def set_lr(optimizer, base_lr: float, factor: float) -> float:
    """Every group's rate = base_lr * factor * its `lr_scale` (the new-token rows may run at their own rate)."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * factor * g.get("lr_scale", 1.0)
    return base_lr * factor


# -- the preference step -----------------------------------------------------------------------------------------


def response_token_logps(model, batch: dict, rt: Runtime) -> torch.Tensor:
    """Log-prob of every response token of a collated batch ([2B, T] from `data.collate_pairs`, 0.0 elsewhere).

    The pair's shared prompt runs once, in one packed forward with both halves' answers (`_hidden_shared_prompt`);
    where the prompts' lengths differ so much that this costs more positions, two forwards run instead, one per half,
    each cut to its own longest row. Either way a short rejected answer (stage 1: the model's direct answer) is not
    padded to the length of a long chosen one with its thinking block. Rows are right padded and attention is causal,
    so the cut changes no real token's hidden state. The head then runs only on rows that predict a response token
    (`targets != -100`), through the chunked `token_logps` (never the full [tokens, vocab] logits); a head that trains
    only new-token rows (stage 1) goes in as a constant matrix plus those rows, so no [V, H] gradient is formed."""
    ids, targets = batch["input_ids"].to(rt.device), batch["targets"].to(rt.device)
    lengths = batch["attention_mask"].sum(dim=1)  # (2B,)
    B2, T = ids.shape
    where = (targets != -100)  # (2B, T) positions that predict a response token, row-major = the order picked below
    if _share_prompt(batch, lengths):
        hidden = _hidden_shared_prompt(model, ids, batch["prompt_lens"].to(rt.device),
                                       batch["response_lens"].to(rt.device), rt)
    else:
        picked = []
        for half in (slice(0, B2 // 2), slice(B2 // 2, B2)):
            t = max(int(lengths[half].max()), 1)
            with rt.autocast_ctx():
                hidden = model(ids[half, :t], return_hidden=True)  # (B, t, H)
            picked.append(hidden[where[half, :t]])  # (n, H)
        hidden = torch.cat(picked)  # (n_chosen + n_rejected, H)
    labels = targets[where]
    weight, rows, row_weight = model.head_parts()
    if rt.autocast is None:  # fp32 log-probs for fp32 or bf16 weights without autocast (evaluation of a bf16 model)
        hidden, weight = hidden.float(), weight.float()
        row_weight = None if row_weight is None else row_weight.float()
    tl = token_logps(hidden, weight, labels, rows=rows, row_weight=row_weight)  # (n,)
    return torch.zeros(B2, T, dtype=tl.dtype, device=tl.device).masked_scatter(where, tl)  # (2B, T)


def _share_prompt(batch: dict, lengths: torch.Tensor) -> bool:
    """Run the pair's common prompt once (`_hidden_shared_prompt`) when that means fewer token positions than one
    forward per half: prompts of different lengths pad the response blocks' keys, and the per-half forwards win."""
    if "prompt_lens" not in batch or "response_lens" not in batch or os.environ.get(SHARE_PROMPT_ENV, "1") == "0":
        return False
    plens, rlens = batch["prompt_lens"], batch["response_lens"]
    B = len(plens) // 2
    if not torch.equal(plens[:B], plens[B:]):
        return False
    shared = int(plens.max()) + int(rlens[:B].max()) + int(rlens[B:].max())
    return shared < int(lengths[:B].max()) + int(lengths[B:].max())


def _hidden_shared_prompt(model, ids, plens, rlens, rt: Runtime) -> torch.Tensor:
    """Final hidden states that predict the response tokens, in `targets != -100` row-major order, with each pair's
    prompt run once: one packed forward over the answers and then the prompts (`model.SharedPrompt`), where the
    answers attend to their prompt's keys (RoPE positions continue from each prompt's length) and every per-token op
    runs over all of them as one matrix. Chosen and rejected answers of similar lengths form one block of 2B rows;
    otherwise one block per half, so a short answer is not padded to a long one. Gradients from both answers meet in
    the prompt's activations. The same numbers as the per-half forwards, up to float rounding (a test holds them
    equal)."""
    B2, T = ids.shape
    B = B2 // 2
    P = plens[:B]  # chosen row b and rejected row B + b share prompt b (data.collate_pairs)
    Pmax, dev = int(P.max()), ids.device
    longest = [max(int(rlens[:B].max()), 1), max(int(rlens[B:].max()), 1)]
    groups = [slice(0, B2)] if 2 * max(longest) <= MERGE_SLACK * sum(longest) else [slice(0, B), slice(B, B2)]
    blocks = [(len(rlens[rows]), max(int(rlens[rows].max()), 1)) for rows in groups]  # (answers n, length R)
    tail = sum(n * R for n, R in blocks)  # the prompts' first packed row
    tokens, positions, index, a = [], [], [], 0
    for rows, (n, R) in zip(groups, blocks):
        j, i = torch.arange(R, device=dev)[None, :], torch.arange(n, device=dev)[:, None]
        pos = plens[rows][:, None] + j  # (n, R) sequence positions of the response tokens
        tokens.append(ids[rows].gather(1, pos.clamp(max=T - 1)))
        positions.append(pos)
        # answer i's token j is predicted by its own token j - 1, token 0 by the last token of its prompt
        at = torch.where(j == 0, tail + i % B * Pmax + plens[rows][:, None] - 1, a + i * R + j - 1)
        index.append(at[j < rlens[rows][:, None]])
        a += n * R
    tokens.append(ids[:B, :Pmax])
    positions.append(torch.arange(Pmax, device=dev).expand(B, Pmax))
    layout = SharedPrompt(blocks, torch.arange(Pmax, device=dev)[None, :] < P[:, None])
    packed_ids, packed_pos = (torch.cat([t.reshape(-1) for t in ts])[None] for ts in (tokens, positions))
    with rt.autocast_ctx():
        h = model(packed_ids, position_ids=packed_pos, attn_mask=layout, return_hidden=True)[0]  # (N, H)
    return h[torch.cat(index)]


def policy_logps(model, batch: dict, spec: LossSpec, rt: Runtime) -> dict:
    """[chosen; rejected] rows -> per-sequence log-probs (mean or sum per the loss) and ORPO's NLL."""
    tl = response_token_logps(model, batch, rt)  # (2B, T)
    loss_mask, nll_mask = batch["loss_mask"].to(rt.device), batch["nll_mask"].to(rt.device)
    seq = sequence_logps(tl, loss_mask, average=spec.average_logps)
    chosen, rejected = seq.chunk(2)
    out = {"chosen": chosen, "rejected": rejected}
    if spec.needs_nll:
        out["nll"] = -sequence_logps(tl, nll_mask, average=True).chunk(2)[0]  # token mean over each chosen response
    return out


def loss_kwargs(name: str, label_smoothing: float) -> dict:
    if name == "sigmoid":
        return {"label_smoothing": label_smoothing}
    if name == "exo_pair":
        return {"epsilon": label_smoothing}
    return {}


def preference_loss(model, batch: dict, spec: LossSpec, name: str, beta: float, label_smoothing: float, rt: Runtime,
                    ref: dict | None = None):
    """Per-example losses and metrics for one micro-batch; `ref` holds reference log-probs for DPO-style losses."""
    pol = policy_logps(model, batch, spec, rt)
    if spec.needs_nll:
        return spec.fn(pol["chosen"], pol["rejected"], pol["nll"], beta)
    if ref is None:
        ref = reference_logps(model, batch, spec, rt)
    return spec.fn(pol["chosen"], pol["rejected"], ref["chosen"].to(rt.device), ref["rejected"].to(rt.device), beta,
                   **loss_kwargs(name, label_smoothing))


@torch.no_grad()
def reference_logps(model, batch: dict, spec: LossSpec, rt: Runtime) -> dict:
    """Reference log-probs = the same network with its LoRA adapters disabled (no second copy of the weights)."""
    from preflexor.lora import disable_lora

    was_training = model.training
    model.eval()  # dropout off: the reference is deterministic
    with disable_lora(model):
        out = policy_logps(model, batch, spec, rt)
    model.train(was_training)
    return {k: v.detach() for k, v in out.items()}


# -- batching ----------------------------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def take_items(n: int, seed: int, position: int, count: int) -> list[int]:
    """Items `position .. position+count-1` of an endless stream of seeded permutations of range(n)."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(position, n)
        order = epoch_order(n, seed, epoch)
        take = min(count - len(out), n - offset)
        out.extend(order[offset:offset + take])
        position += take
    return out


# -- metrics -----------------------------------------------------------------------------------------------------


class Metrics:
    """Appends one JSON object per line to `metrics.jsonl` and averages per-example metrics over a step."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def log(self, record: dict) -> None:
        if self.enabled:
            append_jsonl(self.path, {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()})

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_metrics(records: list[dict], out_png: Path, keys: tuple[str, ...] = (
        "loss", "nll", "rewards/margins", "rewards/accuracies", "eval/rewards/accuracies", "eval/rewards/margins")):
    """One panel per metric against the optimizer step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(k in r for r in records)]
    if not present:
        return
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 2.8), squeeze=False)
    for ax, k in zip(axes[0], present):
        pts = [(r["step"], r[k]) for r in records if k in r and "step" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, out_png, dpi=110)
    plt.close(fig)


def mean_metrics(metrics: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    return {prefix + k: float(v.float().mean()) for k, v in metrics.items()}


# -- checkpoints -------------------------------------------------------------------------------------------------


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


# -- evaluation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_pairs(model, examples: list[dict], pad_id: int, spec: LossSpec, name: str, beta: float,
                   label_smoothing: float, rt: Runtime, batch_size: int = 4, ref_cache: list | None = None) -> dict:
    """Loss, reward accuracy and margins on held-out pairs (model in eval mode)."""
    from preflexor.data import collate_pairs

    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(examples), batch_size):
        batch = collate_pairs(examples[i:i + batch_size], pad_id)
        ref = None
        if ref_cache is not None:  # per-example reference log-probs from `_precompute_ref`
            ref = {k: torch.stack([r[k] for r in ref_cache[i:i + batch_size]]) for k in ("chosen", "rejected")}
        losses, metrics = preference_loss(model, batch, spec, name, beta, label_smoothing, rt, ref=ref)
        k = losses.numel()
        for key, v in {"loss": losses, **metrics}.items():
            total = float(v.float().sum()) if v.ndim else float(v) * k  # per-example tensors, or a batch mean
            sums[key] = sums.get(key, 0.0) + total
        n += k
    model.train(was_training)
    return {f"eval/{k}": v / max(n, 1) for k, v in sums.items()}




# -- the loop both stages run ------------------------------------------------------------------------------------


def fit(model, tok, cfg, rt: Runtime, spec: LossSpec, pairs_for_iteration, heldout: list[dict], out_dir: Path) -> dict:
    """Active preference training: for each iteration, get that iteration's pairs (generated with the current model or
    read from a file), then run `train.steps_per_iteration` optimizer steps on them. Checkpoints every
    `train.save_every` steps and at the end of each iteration; `train.resume=auto` continues from the newest one with
    weights, optimizer, RNG and data position restored, so an interrupted run ends bit-identical to an uninterrupted one.
    Returns the last held-out evaluation."""
    from tqdm import tqdm

    from preflexor.data import collate_pairs, tokenize_pairs

    tc, lc, dc = cfg.train, cfg.loss, cfg.data
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, rt.device, cfg.lora.new_rows_lr)
    total = tc.iterations * tc.steps_per_iteration
    ckpt_root = out_dir / "checkpoints"
    metrics = Metrics(out_dir / "metrics.jsonl", enabled=rt.main)
    state = {"iteration": 0, "step_in_iteration": 0, "global_step": 0, "position": 0}
    resume_from = None
    if tc.resume == "auto":
        resume_from = latest_checkpoint(ckpt_root)
    elif tc.resume not in ("never", ""):
        resume_from = Path(tc.resume)
        if not resume_from.is_dir():
            raise UserError(f"train.resume: checkpoint directory {resume_from} not found")
    if resume_from is not None:
        state.update(load_checkpoint(resume_from, model, optimizer))
        if rt.main:
            print(f"resumed from {resume_from} (step {state['global_step']})")
    elif rt.main and metrics.path.exists():
        metrics.path.unlink()  # a fresh run starts a fresh log

    mask_kw = dict(max_prompt_len=dc.max_prompt_len, max_length=dc.max_length, system=dc.system_prompt,
                   mask_mode=lc.mask, keep_delimiter=lc.keep_delimiter, fraction=lc.mask_fraction)
    held_ex, _ = tokenize_pairs(tok, heldout, generator=torch.Generator().manual_seed(0), **mask_kw)
    held_ref = _precompute_ref(model, held_ex, tok.pad_id, spec, rt, batch_size=4) if spec.needs_ref else None

    def run_eval(step: int) -> dict:
        if not held_ex:
            return {}
        ev = evaluate_pairs(model, held_ex, tok.pad_id, spec, lc.name, lc.beta, lc.label_smoothing, rt,
                            batch_size=4, ref_cache=held_ref)
        metrics.log({"step": step, **ev})
        return ev

    last_eval = run_eval(state["global_step"]) if state["global_step"] == 0 else {}
    bar = tqdm(total=total, initial=state["global_step"], desc="train", disable=not rt.main, dynamic_ncols=True)
    while state["iteration"] < tc.iterations:
        it = state["iteration"]
        records = pairs_for_iteration(it)
        gen = torch.Generator().manual_seed(tc.seed + it)
        examples, dropped = tokenize_pairs(tok, records, generator=gen, **mask_kw)
        if not examples:
            raise UserError(f"iteration {it}: no usable pairs ({dropped} dropped by truncation; raise data.max_length)")
        ref_cache = _precompute_ref(model, examples, tok.pad_id, spec, rt) if spec.needs_ref and lc.precompute_ref else None
        while state["step_in_iteration"] < tc.steps_per_iteration:
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            t_step, n_tokens = time.perf_counter(), 0  # throughput of the optimizer step alone (not eval/datagen)
            for _ in range(tc.grad_accum):
                idx = take_items(len(examples), tc.seed + it, state["position"], tc.batch_size * rt.world)
                idx = idx[rt.rank * tc.batch_size:(rt.rank + 1) * tc.batch_size]
                state["position"] += tc.batch_size * rt.world
                batch = collate_pairs([examples[i] for i in idx], tok.pad_id)
                ref = None
                if ref_cache is not None:
                    ref = {k: torch.stack([ref_cache[i][k] for i in idx]) for k in ("chosen", "rejected")}
                losses, m = preference_loss(model, batch, spec, lc.name, lc.beta, lc.label_smoothing, rt, ref=ref)
                (losses.mean() / tc.grad_accum).backward()
                for k, v in {"loss": losses, **m}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach().float().mean()) / tc.grad_accum
                n_tokens += int(batch["attention_mask"].sum())
            all_reduce_grads(trainable, rt.world)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)) if tc.max_grad_norm > 0 else 0.0
            lr = set_lr(optimizer, tc.lr, lr_factor(state["global_step"], tc.schedule, tc.warmup_steps, total))
            optimizer.step()
            state["global_step"] += 1
            state["step_in_iteration"] += 1
            step = state["global_step"]
            rec = {k: all_reduce_mean(v, rt) for k, v in sums.items()}
            tokens_per_s = n_tokens * rt.world / (time.perf_counter() - t_step)
            rec.update(step=step, iteration=it, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s)
            if step % max(tc.log_every, 1) == 0:
                metrics.log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", margin=f"{rec.get('rewards/margins', 0.0):.3f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}")
            end_of_iteration = state["step_in_iteration"] >= tc.steps_per_iteration
            if (tc.eval_every and step % tc.eval_every == 0) or (end_of_iteration and not tc.eval_every):
                last_eval = run_eval(step)
            if end_of_iteration:
                state.update(iteration=it + 1, step_in_iteration=0, position=0)
            if rt.main and ((tc.save_every and step % tc.save_every == 0) or end_of_iteration):
                save_checkpoint(ckpt_root, step, model, optimizer, state, tc.keep_last)
            if rt.world > 1:
                dist.barrier()
            if end_of_iteration:
                break
    bar.close()
    if not last_eval:
        last_eval = run_eval(state["global_step"])
    if rt.main:
        plot_metrics(metrics.read(), out_dir / "curves.png")
    return last_eval


@torch.no_grad()
def _precompute_ref(model, examples: list[dict], pad_id: int, spec: LossSpec, rt: Runtime,
                    batch_size: int = 1) -> list[dict]:
    """Reference log-probs of every example once (adapters disabled), so training steps skip the reference forward.
    The held-out set is done in `evaluate_pairs`' batches: the same shapes give the same float rounding, so at step 0
    policy and reference agree exactly and the held-out rewards are exactly zero (no ties broken by noise)."""
    from preflexor.data import collate_pairs

    out = []
    for i in range(0, len(examples), batch_size):
        r = reference_logps(model, collate_pairs(examples[i:i + batch_size], pad_id), spec, rt)
        out += [{"chosen": c.cpu(), "rejected": j.cpu()} for c, j in zip(r["chosen"], r["rejected"])]
    return out


# -- data for the loop -------------------------------------------------------------------------------------------


class PairSource:
    """Where each iteration's pairs come from: a fixed preference JSONL (the last `data.heldout_pairs` records held
    out), or the active loop, which generates `data.pairs_per_iteration` fresh pairs per iteration with the current
    model writing the rejected answers (stage 1 without the thinking trigger, stage 2 with it). Generated pairs are
    kept in `out_dir/data/` (iter_NNN.jsonl, heldout.jsonl); a resumed run reads them back instead of regenerating."""

    HELDOUT_INDEX = 1_000_000  # held-out examples live in their own index range, away from training contexts

    def __init__(self, cfg, tok, model, rt: Runtime, out_dir: Path, stage: int):
        from preflexor.data import load_pairs

        self.cfg, self.tok, self.model, self.rt, self.stage = cfg, tok, model, rt, stage
        self.dir = out_dir / "data"
        dc = cfg.data
        if dc.pairs:
            records = load_pairs(dc.pairs)
            n_held = min(dc.heldout_pairs, max(len(records) - 1, 0))
            self.train_records, self.heldout_records = records[:len(records) - n_held], records[len(records) - n_held:]
            self.sources = None
        else:
            from preflexor.datagen import DatagenConfig, build_sources, build_teacher

            gcfg = DatagenConfig(corpus=dc.corpus, retrieval=dc.retrieval, teacher=dc.teacher,
                                 teacher_url=dc.teacher_url, teacher_model=dc.teacher_model,
                                 teacher_source=dc.teacher_source, seed=dc.seed, system_prompt=dc.system_prompt,
                                 kg_triples=dc.kg_triples, section_lines=dc.section_lines)
            docs, chunks, graph, retriever = build_sources(gcfg)
            self.sources = (build_teacher(gcfg, docs, chunks, graph, retriever), docs, chunks, graph, retriever)
            self.heldout_records = None

    def _generate(self, n: int, start_index: int, path: Path) -> list[dict]:
        from preflexor.data import load_pairs
        from preflexor.datagen import generate_pairs

        if self.rt.main:
            teacher, docs, chunks, graph, retriever = self.sources
            sc = self.cfg.sample
            was_training = self.model.training
            self.model.eval()
            records = generate_pairs(n, teacher, docs, chunks, graph, retriever,
                                     rejected_source=self.cfg.data.rejected_source, model=self.model,
                                     tokenizer=self.tok, out_path=path, seed=self.cfg.data.seed,
                                     start_index=start_index, stage=self.stage, kg_triples=self.cfg.data.kg_triples,
                                     max_new_tokens=sc.max_new_tokens,
                                     temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
                                     system_prompt=self.cfg.data.system_prompt)
            self.model.train(was_training)
            from preflexor import cpu_infer

            cpu_infer.release(self.model)  # training changes the weights next: the packed CPU copy would go stale
        if self.rt.world > 1:
            dist.barrier()
            if not self.rt.main:
                records = load_pairs(path)
        return records

    def heldout(self) -> list[dict]:
        if self.heldout_records is None:
            self.heldout_records = self._generate(self.cfg.data.heldout_pairs, self.HELDOUT_INDEX,
                                                  self.dir / "heldout.jsonl")
        return self.heldout_records

    def for_iteration(self, it: int) -> list[dict]:
        if self.sources is None:
            return self.train_records
        n = self.cfg.data.pairs_per_iteration
        return self._generate(n, it * n, self.dir / f"iter_{it:03d}.jsonl")


def run_stage(model, tok, cfg, rt: Runtime, spec: LossSpec, out_dir: Path, stage: int) -> dict:
    """What both stages do once the model is built: data (a JSONL or the active loop), the thinking-format rate
    before, the training loop, the format rate after, and the saved adapter and merged model."""
    from preflexor.evaluate import format_rate

    source = PairSource(cfg, tok, model, rt, out_dir, stage=stage)
    heldout = source.heldout()
    questions = [r["prompt"] for r in heldout[:cfg.train.eval_generations]]
    n_new = cfg.train.eval_max_new_tokens
    before = format_rate(model, tok, questions, n_new, cfg.data.system_prompt) if rt.main and questions else None
    last_eval = fit(model, tok, cfg, rt, spec, source.for_iteration, heldout, out_dir)
    return finish_run(model, tok, cfg, rt, out_dir, questions, before, last_eval)


def finish_run(model, tok, cfg, rt: Runtime, out_dir: Path, questions: list[str], before: dict | None,
               last_eval: dict) -> dict:
    """After training: the thinking-format rate again, `summary.json`, the PEFT adapter in `final/adapter/` and the
    merged model in HF format in `final/model/` (main rank only)."""
    from preflexor.checkpoint import save_model
    from preflexor.evaluate import format_rate
    from preflexor.lora import merge_lora, save_adapter

    summary = {"eval": last_eval}
    if not rt.main:
        return summary
    after = format_rate(model, tok, questions, cfg.train.eval_max_new_tokens, cfg.data.system_prompt) if questions else None
    summary.update(format_before=before, format_after=after)
    if before and after:
        print(f"thinking-format rate: before {before['format_rate']:.2f} -> after {after['format_rate']:.2f} "
              f"(opens with <|thinking|>: {before['opens_thinking_rate']:.2f} -> {after['opens_thinking_rate']:.2f})")
    print("held-out: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in last_eval.items()))
    save_adapter(model, out_dir / "final" / "adapter", base_model_name_or_path=cfg.model.source)
    if cfg.train.save_merged:
        merge_lora(model)
        save_model(model, tok, out_dir / "final" / "model")
    atomic_write_json(out_dir / "summary.json", summary)
    print(f"saved {out_dir / 'final'}")
    return summary
