"""`linear(x, W)` = x @ W^T through oneDNN for float32 on the CPU, else `F.linear`.

Why: the training step is mostly GEMMs of a few hundred rows against the frozen projections and the LM head. On the
2-core AMD Zen 4 CPU we measure on, MKL's sgemm (what `F.linear` and `@` run) reaches 110-190 GFLOP/s on these shapes;
oneDNN's `_linear_pointwise` reaches 180-215 with no weight repacking (bench/RESULTS_train.md): 1.15-1.3x on the
trunk's projections, 1.6x on the head's [256, 576] x [576, 49152]. It also runs the backward's `dy @ W` given the
transposed view `W.t()` (no copy). Same float32 math; only the summation order differs (~1e-6 relative).

`PREFLEXOR_ONEDNN=0` keeps `F.linear` everywhere (for A/B timing, or a torch build whose oneDNN misbehaves).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ENV_SWITCH = "PREFLEXOR_ONEDNN"


def onednn_ok(*tensors: torch.Tensor | None) -> bool:
    """oneDNN serves float32 CPU tensors that need no autograd (it has no backward: callers that train use it
    inside their own autograd Functions)."""
    ts = [t for t in tensors if t is not None]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)
            and torch.backends.mkldnn.is_available() and os.environ.get(ENV_SWITCH, "1") != "0"
            and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ w [out, in]^T (+ bias); `w` may be a transposed view (pass `W.t()` for x @ W)."""
    if onednn_ok(x, w, bias):
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)
