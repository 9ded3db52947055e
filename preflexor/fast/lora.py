"""LoRA linears on a frozen base as one autograd Function: the training step's fast path (installed by `fast.install`).

`project(x, *modules)` = `[m(x) for m in modules]` with the same numbers; modules sharing an input (q/k/v, gate/up)
run as one `_FrozenLoRA` call where it applies, and everything else falls back to the plain module.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from preflexor.fast import matmul
from preflexor.lora import LoRALinear


class _FrozenLoRA(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s_i (xd A_i^T) B_i^T for frozen W_i, b_i and modules i sharing the input x (q/k/v, or
    gate/up), where xd is x or dropout(x). The LoRA term is added into the base GEMM's output (one addmm), the base
    GEMMs run through `matmul.linear` (oneDNN on the CPU), the modules' A matrices act as one [sum r, in] matrix
    (one skinny GEMM forward and one backward instead of one per module), and only xd and the [M, sum r] product
    xd A^T are kept for the backward (the frozen W_i get no gradient):
    d xa_i = s_i dy_i B_i, dA_i = d xa_i^T xd, dB_i = s_i dy_i^T xa_i, dx = sum_i dy_i W_i (+ d xa A when xd is x).
    `project` uses the plain modules wherever this does not apply; tests hold them equal."""

    @staticmethod
    def forward(ctx, x, xd, scales, *params):  # params: (weight, bias, a, b) per module
        ws, biases, As, Bs = params[0::4], params[1::4], params[2::4], params[3::4]
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if xd is x else xd.reshape(-1, xd.shape[-1])
        ranks = [a.shape[0] for a in As]
        xa = torch.mm(xd2, (As[0] if len(As) == 1 else torch.cat(As)).t())  # [M, sum r]
        outs = []
        for w, bias, b, xa_i, scale in zip(ws, biases, Bs, xa.split(ranks, dim=1), scales):
            y = matmul.linear(x2, w, bias)
            y.addmm_(xa_i, b.t(), alpha=scale)
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.scales, ctx.ranks, ctx.same, ctx.x_shape, ctx.xd_shape = scales, ranks, xd is x, x.shape, xd.shape
        ctx.save_for_backward(xd2, xa, *ws, *As, *Bs)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        n = len(ctx.scales)
        xd2, xa, *saved = ctx.saved_tensors  # unpacked once (checkpointing allows no second unpack)
        ws, As, Bs = saved[:n], saved[n:2 * n], saved[2 * n:]
        g2s = [g.reshape(-1, g.shape[-1]) for g in grads]
        gxa = torch.cat([torch.mm(g, b) for g, b in zip(g2s, Bs)], dim=1) if n > 1 else torch.mm(g2s[0], Bs[0])
        for gxa_i, scale in zip(gxa.split(ctx.ranks, dim=1), ctx.scales):
            gxa_i.mul_(scale)  # [M, r_i]
        gBs = [torch.mm(g.t(), xa_i).mul_(scale) for g, xa_i, scale in zip(g2s, xa.split(ctx.ranks, dim=1), ctx.scales)]
        gAs = torch.mm(gxa.t(), xd2).split(ctx.ranks, dim=0)
        a_cat = As[0] if n == 1 else torch.cat(As)
        gx = gxd = None
        if ctx.needs_input_grad[0]:
            gx = matmul.linear(g2s[0], ws[0].t())  # dy @ W
            for g, w in zip(g2s[1:], ws[1:]):
                gx.add_(matmul.linear(g, w.t()))
            if ctx.same:
                gx.addmm_(gxa, a_cat)
            gx = gx.view(ctx.x_shape)
        if ctx.needs_input_grad[1] and not ctx.same:
            gxd = torch.mm(gxa, a_cat).view(ctx.xd_shape)
        per_module = []
        for gA, gB in zip(gAs, gBs):
            per_module += [None, None, gA, gB]
        return (gx, gxd, None, *per_module)


def fusable(m: nn.Module, x: torch.Tensor) -> bool:
    """`_FrozenLoRA` applies to `m`: an active LoRA on a frozen base without trainable rows, one dtype, no autocast."""
    if not isinstance(m, LoRALinear) or not m.active or m.new_rows is not None or m.weight.requires_grad:
        return False
    if m.bias is not None and (m.bias.requires_grad or m.bias.dtype != x.dtype):
        return False
    return x.dtype == m.weight.dtype == m.lora_a.dtype == m.lora_b.dtype and not torch.is_autocast_enabled(x.device.type)


def _one(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if fusable(m, x):
        return _FrozenLoRA.apply(x, m.dropout(x), (m.scale,), m.weight, m.bias, m.lora_a, m.lora_b)[0]
    if isinstance(m, LoRALinear) and not m.active and m.new_rows is None:
        return matmul.linear(x, m.weight, m.bias)  # oneDNN when no gradient is needed (the disabled reference)
    return m(x)


def project(x: torch.Tensor, *modules: nn.Module) -> list[torch.Tensor]:
    """[m(x) for m in modules]; LoRA linears on a frozen base without dropout (q/k/v, gate/up) run as one
    `_FrozenLoRA` call (their A matrices as one GEMM). Same numbers as calling each module."""
    if len(modules) > 1 and all(fusable(m, x) and isinstance(m.dropout, nn.Identity) for m in modules):
        params = [t for m in modules for t in (m.weight, m.bias, m.lora_a, m.lora_b)]
        return list(_FrozenLoRA.apply(x, x, tuple(m.scale for m in modules), *params))
    return [_one(m, x) for m in modules]
