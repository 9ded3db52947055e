"""`linear(x, W)` = x @ W^T through oneDNN for float32 on the CPU, else `F.linear`.

The training step is mostly GEMMs of a few hundred rows against the frozen projections and the LM head, where
oneDNN's `_linear_pointwise` runs faster than MKL's sgemm (what `F.linear` runs) with no weight repacking
(bench/RESULTS_train.md). It also runs the backward's `dy @ W` given the transposed view `W.t()` (no copy). Same
float32 math; only the summation order differs (~1e-6 relative). `ONEDNN = False` keeps `F.linear` (tests, A/B).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ONEDNN = True


def onednn_ok(*tensors: torch.Tensor | None) -> bool:
    """oneDNN serves float32 CPU tensors that need no autograd (it has no backward: callers that train use it
    inside their own autograd Functions)."""
    ts = [t for t in tensors if t is not None]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)
            and torch.backends.mkldnn.is_available() and ONEDNN
            and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ w [out, in]^T (+ bias); `w` may be a transposed view (pass `W.t()` for x @ W)."""
    if onednn_ok(x, w, bias):
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)
