"""AdamW over the trainable parameters and the learning-rate schedule (linear warmup, then constant or cosine)."""
from __future__ import annotations

import math

import torch

from preflexor.errors import UserError


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
    # fused: one kernel over all tensors, on the CPU too (bench/RESULTS_train.md: far faster than "foreach" there)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type in ("cuda", "cpu"))


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warmup, then constant or
    cosine."""
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
