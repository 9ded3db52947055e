"""Fast subclasses of the reference modules (same parameters, same state-dict keys), swapped in by `fast.install`.

- `FastRMSNorm`: torch's fused `F.rms_norm` for float32, and on the CPU while training a hand-written backward
  (torch differentiates rms_norm there through its decomposition, about ten passes over x).
- `apply_rope`: RoPE written in halves into one output, with the same roundings as the formula; its backward is the
  rotation by -sin.
- `FastAttention` / `FastMLP`: LoRA projections sharing an input run as one autograd Function (fast/lora.py), the
  CPU attention takes grouped k/v without copies, and a `SharedPrompt` layout (one packed row of answers and the
  prompts they continue) is attended per segment (fast/shared_prompt.py).
- `FastTransformer`: checks a `SharedPrompt` against the input before the reference forward runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from preflexor.fast.lora import project
from preflexor.fast.shared_prompt import SharedPrompt, sdpa
from preflexor.model import MLP, Attention, RMSNorm, Transformer, rotate_half


class _RMSNormCPU(torch.autograd.Function):
    """F.rms_norm with a hand-written backward. With r = rsqrt(mean(x^2) + eps):
    dx = r (g w) - x r^3 mean(g w x), dw = sum over rows of g x r. Only x is saved; r is recomputed."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.eps = eps
        ctx.save_for_backward(x, weight)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        H = x.shape[-1]
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(H).add_(ctx.eps).rsqrt_()
        gw = g * weight
        coef = torch.linalg.vecdot(gw, x, dim=-1).unsqueeze(-1).mul_(r.pow(3)).div_(-H)
        dw = (g * x * r).reshape(-1, H).sum(0) if ctx.needs_input_grad[1] else None
        return gw.mul_(r).addcmul_(x, coef), dw, None


class FastRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # torch's fused op: same float32 math
            if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _RMSNormCPU.apply(x, self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return super().forward(x)


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[x1 c - x2 s, x2 c + x1 s] for the halves x1, x2 of x, written into one output; the formula's roundings (no
    fused multiply-add), without the chunk, neg and cat copies of `rotate_half` on transposed views."""
    h = x.shape[-1] // 2
    out = torch.empty_like(x)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, c, out=o1).sub_(x2 * s)
    torch.mul(x2, c, out=o2).add_(x1 * s)
    return out


class _Rope(torch.autograd.Function):
    """RoPE is a rotation per position and frequency, so its backward is the rotation by -sin."""

    @staticmethod
    def forward(ctx, x, c, s):
        ctx.save_for_backward(c, s)
        return _rotate(x, c, s)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        c, s = ctx.saved_tensors
        return _rotate(g, c, -s), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`model.apply_rope`, bit for bit; cos/sin (..., D) repeat their first half (`Transformer.rope`)."""
    if x.dtype != cos.dtype:  # autocast: the product in the wider type, as the reference does
        return (x * cos + rotate_half(x) * sin).to(x.dtype)
    h = x.shape[-1] // 2
    return _Rope.apply(x, cos[..., :h], sin[..., :h])


class FastAttention(Attention):
    def forward(self, x, cos, sin, input_pos=None, attn_mask=None):
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(attn_mask, SharedPrompt):
            y = attn_mask.attend(q[0], k[0], v[0])  # (T, nh*D)
            return project(y.view(B, T, -1), self.o_proj)[0]
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, D)
            if attn_mask is not None:  # the caller's mask may cover only the slots in use
                k, v = k[:, :, :attn_mask.shape[-1]], v[:, :, :attn_mask.shape[-1]]
        y = sdpa(q, k, v, attn_mask).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*D)
        return project(y, self.o_proj)[0]


class FastMLP(MLP):
    def forward(self, x):
        gate, up = project(x, self.gate_proj, self.up_proj)
        return project(F.silu(gate) * up, self.down_proj)[0]


class FastTransformer(Transformer):
    def forward(self, input_ids, input_pos=None, position_ids=None, attn_mask=None, return_hidden=False):
        if isinstance(attn_mask, SharedPrompt):
            B, T = input_ids.shape
            if B != 1 or position_ids is None or attn_mask.length != T:
                raise ValueError(f"a SharedPrompt of {attn_mask.length} tokens needs input_ids (1, "
                                 f"{attn_mask.length}) and position_ids")
        return super().forward(input_ids, input_pos, position_ids, attn_mask, return_hidden)


SWAPS = {RMSNorm: FastRMSNorm, Attention: FastAttention, MLP: FastMLP, Transformer: FastTransformer}
