"""A faithful Llama-family decoder in plain PyTorch (Llama 3.x, SmolLM2, Qwen2).

Module names are identical to Hugging Face's `LlamaForCausalLM` (`model.layers.{i}.self_attn.q_proj.weight`, ...),
and RoPE uses the same half-split (rotate_half) layout, so HF safetensors load with `strict=True` and no mapping
table. The model returns logits, or the final hidden states for the fused loss path (which needs hidden states and
the head weight, never the full logits). Generation uses a preallocated KV cache indexed by position.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from preflexor import lora


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 uses q/k/v bias (and no o bias)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, cfg: dict | str | Path) -> "ModelConfig":
        """Read sizes, rope and tying from an HF config.json (a dict or a path); unknown keys are kept in `extra`."""
        if not isinstance(cfg, dict):
            cfg = json.loads(Path(cfg).read_text())
        cfg = dict(cfg)
        if "text_config" in cfg:  # multimodal wrappers keep the LM config inside
            cfg = {**cfg, **cfg["text_config"]}
        model_type = cfg.get("model_type", "llama")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kw = {k: cfg[k] for k in known if k in cfg}
        kw["model_type"] = model_type
        kw.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
        if model_type == "qwen2":
            kw["attention_bias"] = True
        rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            kw["rope_scaling"] = rope_scaling
        else:
            kw["rope_scaling"] = None
        if "rope_theta" not in cfg and isinstance(rope_scaling, dict) and "rope_theta" in rope_scaling:
            kw["rope_theta"] = rope_scaling["rope_theta"]  # transformers 5 keeps theta in rope_parameters
        extra = {k: v for k, v in cfg.items() if k not in known and k not in ("rope_parameters",)}
        return cls(**kw, extra=extra)

    def to_hf(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        out = {**extra, **{k: v for k, v in d.items() if v is not None}}
        out["architectures"] = ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"]
        out["hidden_act"] = "silu"
        out.setdefault("torch_dtype", "float32")
        if self.model_type == "qwen2":
            out.pop("attention_bias", None)
        out["rope_scaling"] = self.rope_scaling
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # torch's fused op: same float32 math
            if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _RMSNormCPU.apply(x, self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in float32, then cast back (as the Llama reference does).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class _RMSNormCPU(torch.autograd.Function):
    """F.rms_norm with a hand-written backward: on the CPU torch differentiates rms_norm through its decomposition
    (about ten passes over x, 3.1 vs 0.8 ms forward + backward at 896 x 576). With r = rsqrt(mean(x^2) + eps):
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


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama-3 `rope_scaling` (type "llama3") applied when configured."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    kind = rs.get("rope_type", rs.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, and the band between is interpolated smoothly.
    scaled = torch.where(wavelen > lo_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return torch.where(is_mid, mid, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in x's dtype; cos/sin (..., D) repeat their first half (`Transformer.rope`)."""
    if x.dtype != cos.dtype:  # autocast: the product in the wider type, as the Llama reference does
        return (x * cos + rotate_half(x) * sin).to(x.dtype)
    h = x.shape[-1] // 2
    return _Rope.apply(x, cos[..., :h], sin[..., :h])


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[x1 c - x2 s, x2 c + x1 s] for the halves x1, x2 of x, written into one output; the same roundings as the
    formula (no fused multiply-add), 20x faster on the transposed (B, heads, T, D) views than chunk, neg, cat, mul."""
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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(H, self.n_head * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, self.n_kv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, self.n_kv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * D, H, bias=cfg.attention_bias and cfg.model_type != "qwen2")
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos=None, attn_mask=None):
        """attn_mask: (B, 1, T, S) bool, True = attend; None = causal; or a `SharedPrompt` for a packed row (B = 1)."""
        B, T, _ = x.shape
        q, k, v = lora.project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(attn_mask, SharedPrompt):
            y = attn_mask.attend(q[0], k[0], v[0])  # (T, nh*D)
            return self.o_proj(y.view(B, T, -1))
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, D)
        y = attention(q, k, v, attn_mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*D)
        return self.o_proj(y)


def attention(q, k, v, attn_mask=None):
    """SDPA over (B, nh, T, D) queries and (B, nkv, S, D) keys/values, causal when attn_mask is None. Grouped-query
    attention (each kv head serves nh/nkv query heads): the CPU kernel takes the grouped k/v as they are (no expanded
    copies saved for the backward); elsewhere they are expanded."""
    n_head, n_kv = q.shape[1], k.shape[1]
    gqa = n_kv != n_head and q.device.type == "cpu"
    if n_kv != n_head and not gqa:
        k = k.repeat_interleave(n_head // n_kv, dim=1)  # (B, nh, S, D)
        v = v.repeat_interleave(n_head // n_kv, dim=1)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)


@dataclass
class SharedPrompt:
    """Attention layout of one packed row whose answers share their prompts (`train._hidden_shared_prompt`): every
    per-token op (norms, projections, MLP) runs once over all rows as one matrix, attention runs per segment.

    The packed tokens are answer blocks first, then the prompts: `blocks` lists (rows n, length R) per block, its n
    answers of R tokens (right padded) in order, answer i continuing prompt i % Bp; then Bp prompts of P tokens (right
    padded; `keys` (Bp, P) marks the real ones). Prompts attend causally to themselves; answers attend to their
    prompt's real tokens and causally to themselves (`masks`: one (n or 1, 1, R, P + R) bool mask per block)."""
    blocks: list[tuple[int, int]]
    keys: torch.Tensor
    tiled: bool | None = None  # None: `_TiledAttention` where it serves (float32/64 on the CPU), else SDPA per segment

    def __post_init__(self):
        Bp, P = self.keys.shape
        self.masks, self._additive, self._stacked = [], {}, {}
        self.full = bool(self.keys.all())  # prompts of one length: one (1, 1, R, P + R) mask serves every row
        for n, R in self.blocks:
            causal = torch.ones(R, R, dtype=torch.bool, device=self.keys.device).tril()
            rows = 1 if self.full else n
            prompt = (self.keys[:1] if self.full else self.keys.repeat(n // Bp, 1))[:, None, :].expand(rows, R, P)
            self.masks.append(torch.cat([prompt, causal.expand(rows, R, R)], dim=2)[:, None])

    @property
    def length(self) -> int:
        return sum(n * R for n, R in self.blocks) + self.keys.numel()

    def attend(self, q, k, v):
        """q (nh, T, D), k/v (nkv, T, D) of the packed row after RoPE -> attention output (T, nh*D)."""
        if _tiled_ok(q) if self.tiled is None else self.tiled:
            return _TiledAttention.apply(q, k, v, self)
        Bp, P = self.keys.shape
        sizes = [n * R for n, R in self.blocks] + [Bp * P]
        shapes = self.blocks + [(Bp, P)]
        # split (not slices): the backward joins the segments' gradients with one cat instead of zero-filled copies
        qs, ks, vs = ([t.unflatten(1, nr).transpose(0, 1) for t, nr in zip(x.split(sizes, dim=1), shapes)]
                      for x in (q, k, v))  # per segment (n, heads, R, D) views
        kp, vp = ks[-1], vs[-1]
        if q.dtype not in self._additive:  # SDPA turns a bool mask into an additive one on every call
            self._additive[q.dtype] = [_additive(m, q.dtype) for m in self.masks]
        outs = []
        for (n, R), mask, qa, ka, va in zip(self.blocks, self._additive[q.dtype], qs, ks, vs):
            c = n // Bp  # copies of each prompt in this block (2: chosen and rejected)
            kc, vc = (kp, vp) if c == 1 else (kp.repeat(c, 1, 1, 1), vp.repeat(c, 1, 1, 1))
            keys, values = torch.cat([kc, ka], dim=2), torch.cat([vc, va], dim=2)  # (n, nkv, P + R, D)
            outs.append(attention(qa, keys, values, mask))
        outs.append(attention(qs[-1], kp, vp))
        return torch.cat([y.transpose(1, 2).flatten(0, 1).flatten(1) for y in outs])  # (T, nh*D)

    def stacked_masks(self, group: int, n_kv: int, dtype) -> list[torch.Tensor]:
        """Additive masks for `_TiledAttention`: per answer block (1 or n * n_kv, R * group, P + R), then the
        prompts' causal (1, P * group, P); query rows stacked (position, head of the group), as the kernel stacks
        them."""
        key = (group, n_kv, dtype)
        if key not in self._stacked:
            Bp, P = self.keys.shape
            causal = torch.ones(P, P, dtype=torch.bool, device=self.keys.device).tril()[None, None]
            out = []
            for m in self.masks + [causal]:
                rows, _, R, S = m.shape
                add = _additive(m[:, 0], dtype).repeat_interleave(group, dim=1)  # (rows, R * group, S)
                if rows > 1:
                    add = add[:, None].expand(rows, n_kv, R * group, S).reshape(rows * n_kv, R * group, S)
                out.append(add)
            self._stacked[key] = out
        return self._stacked[key]


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """A bool mask (True = attend) as the additive one attention adds to its scores (0 or -inf)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


TILE_ROWS = 64  # query positions per tile of `_TiledAttention` (48-64 measured best at 192 answer tokens)


def _tiled_ok(q: torch.Tensor) -> bool:
    """The tiled attention serves float32/float64 on the CPU (CUDA keeps the fused SDPA kernels)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")


class _TiledAttention(torch.autograd.Function):
    """Attention over a `SharedPrompt` row on the CPU with the masked work skipped: batched GEMMs over tiles of
    TILE_ROWS query positions, each against only the keys it can see (its prompt and its answer up to the tile's last
    position), so a 64 + 192 answer block computes 75% of the full [192 x 256] scores; the softmax is kept for the
    backward (no recomputation). The grouped query heads of one kv head are stacked into the rows of one product.
    Exact attention: equal to the SDPA path up to float rounding (tests hold values and gradients to it).

    Per segment (answer block of n rows x R, or the prompts): Q (n * nkv, R * g, D) pre-scaled by 1/sqrt(D), with
    rows ordered (position, head of the group); K, V (n * nkv, P + R, D) = [the row's prompt keys; its own keys]."""

    @staticmethod
    def forward(ctx, q, k, v, layout):
        nh, T, D = q.shape
        nkv = k.shape[0]
        g = nh // nkv
        Bp, P = layout.keys.shape
        scale, tile = D ** -0.5, TILE_ROWS
        qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (T, heads, D)
        out = q.new_empty(T, nh, D)
        masks = layout.stacked_masks(g, nkv, q.dtype)
        p0 = T - Bp * P  # the prompts' first packed position
        kp = kt[p0:].view(Bp, P, nkv, D).transpose(1, 2)  # (Bp, nkv, P, D)
        vp = vt[p0:].view(Bp, P, nkv, D).transpose(1, 2)
        # segments (first packed position, rows n, length R, prompt keys in front pre): the answer blocks, then the
        # prompts themselves (causal, no prefix)
        segments, a = [], 0
        for n, R in layout.blocks:
            segments.append((a, n, R, P))
            a += n * R
        segments.append((p0, Bp, P, 0))
        saved = []
        for (a, n, R, pre), mask in zip(segments, masks):
            masked_prefix = pre and not layout.full  # answers after prompts of different lengths: padding keys
            qs = torch.empty(n, nkv, R, g, D, dtype=q.dtype, device=q.device)
            torch.mul(qt[a:a + n * R].view(n, R, nkv, g, D).transpose(1, 2), scale, out=qs)
            ks = torch.empty(n, nkv, pre + R, D, dtype=q.dtype, device=q.device)
            vs = torch.empty_like(ks)
            for dst, src, pref in ((ks, kt, kp), (vs, vt, vp)):
                dst[:, :, pre:] = src[a:a + n * R].view(n, R, nkv, D).transpose(1, 2)
                if pre:
                    dst[:, :, :P].view(n // Bp, Bp, nkv, P, D).copy_(pref.expand(n // Bp, Bp, nkv, P, D))
            qs, ks, vs = qs.view(n * nkv, R * g, D), ks.view(n * nkv, pre + R, D), vs.view(n * nkv, pre + R, D)
            os_ = torch.empty_like(qs)
            probs = []
            for r0 in range(0, R, tile):
                r1 = min(R, r0 + tile)
                L = pre + r1
                s = torch.bmm(qs[:, r0 * g:r1 * g], ks[:, :L].transpose(1, 2))
                lo = 0 if masked_prefix else pre + r0  # keys before the tile's own positions are all visible
                s[:, :, lo:].add_(mask[:, r0 * g:r1 * g, lo:L])
                p = torch.softmax(s, dim=-1)
                del s
                os_[:, r0 * g:r1 * g] = torch.bmm(p, vs[:, :L])
                probs.append(p)
            out[a:a + n * R].view(n, R, nkv, g, D).copy_(os_.view(n, nkv, R, g, D).transpose(1, 2))
            saved += [qs, ks, vs, *probs]
        ctx.layout, ctx.segments, ctx.dims, ctx.tile = layout, segments, (nh, nkv, g, D), tile
        ctx.save_for_backward(*saved)
        return out.view(T, nh * D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        layout = ctx.layout
        saved, i = ctx.saved_tensors, 0
        Bp, P = layout.keys.shape
        T = grad.shape[0]
        nh, nkv, g, D = ctx.dims
        scale = D ** -0.5
        go = grad.reshape(T, nh, D)
        dq = grad.new_empty(T, nh, D)
        dk = grad.new_empty(T, nkv, D)
        dv = grad.new_empty(T, nkv, D)
        p0 = T - Bp * P
        prefix_grads = []
        for a, n, R, pre in ctx.segments:
            count = 3 + -(-R // ctx.tile)  # q, k, v and one softmax per tile
            qs, ks, vs, *probs = saved[i:i + count]
            i += count
            dos = go[a:a + n * R].view(n, R, nkv, g, D).transpose(1, 2).reshape(n * nkv, R * g, D)
            dqs = torch.empty_like(qs)
            dks = dvs = None
            for j in reversed(range(len(probs))):  # the last tile sees every key: it creates dK, dV
                r0 = j * ctx.tile
                r1 = min(R, r0 + ctx.tile)
                L = pre + r1
                p, do_t, q_t = probs[j], dos[:, r0 * g:r1 * g], qs[:, r0 * g:r1 * g]
                dv_t = torch.bmm(p.transpose(1, 2), do_t)  # (n * nkv, L, D)
                ds = torch._softmax_backward_data(torch.bmm(do_t, vs[:, :L].transpose(1, 2)), p, -1, p.dtype)
                dqs[:, r0 * g:r1 * g] = torch.bmm(ds, ks[:, :L])
                dk_t = torch.bmm(ds.transpose(1, 2), q_t)
                if dks is None:
                    dks, dvs = dk_t, dv_t
                else:  # (a product into the strided slice would run batch by batch)
                    dks[:, :L].add_(dk_t)
                    dvs[:, :L].add_(dv_t)
            dq[a:a + n * R].view(n, R, nkv, g, D).copy_(dqs.view(n, nkv, R, g, D).transpose(1, 2)).mul_(scale)
            for dst, src in ((dk, dks), (dv, dvs)):
                dst[a:a + n * R].view(n, R, nkv, D).copy_(src.view(n, nkv, pre + R, D)[:, :, pre:].transpose(1, 2))
            if pre:
                prefix_grads.append((n, dks.view(n, nkv, P + R, D)[:, :, :P], dvs.view(n, nkv, P + R, D)[:, :, :P]))
        for n, dkp, dvp in prefix_grads:  # the answers' gradients of their prompt's keys/values
            for dst, src in ((dk, dkp), (dv, dvp)):
                dst[p0:].view(Bp, P, nkv, D).add_(src.view(n // Bp, Bp, nkv, P, D).sum(0).transpose(1, 2))
        return dq.transpose(0, 1), dk.transpose(0, 1), dv.transpose(0, 1), None


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = lora.project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, input_pos=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache(nn.Module):
    """Preallocated keys/values of shape (B, n_kv, max_seq_len, D); `update` writes at `input_pos` and returns the
    whole buffer, so attention over it needs a mask that hides unwritten slots."""

    def __init__(self, B: int, n_kv: int, max_seq_len: int, D: int, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(B, n_kv, max_seq_len, D, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(B, n_kv, max_seq_len, D, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """`LlamaForCausalLM`-compatible decoder: `model.*` holds the stack, `lm_head` exists only when untied."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False
        self.max_cache_len = 0

    # -- weights -----------------------------------------------------------------------------------------------
    def head_weight(self) -> torch.Tensor:
        """The output projection [V, H] as a tensor (LoRA / trainable-row wrappers expose `effective_weight`)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.effective_weight() if hasattr(head, "effective_weight") else head.weight

    def head_parts(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`head_weight()` split as (constant [V, H], row ids [K], trainable rows [K, H]) when the head's only
        trainable part is new-token rows (lora.train_new_token_rows, no head LoRA), else (head_weight(), None, None);
        `logprobs.token_logps(..., rows=, row_weight=)` then trains the rows without a [V, H] gradient."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.head_parts() if hasattr(head, "head_parts") else (self.head_weight(), None, None)

    def head_bias(self) -> torch.Tensor | None:
        return None if self.lm_head is None else getattr(self.lm_head, "bias", None)

    @torch.no_grad()
    def resize_vocab(self, new_size: int) -> None:
        """Grow the embedding (and an untied head) to `new_size` rows, new rows set to the mean embedding."""
        old = self.model.embed_tokens.weight
        V, H = old.shape
        if new_size <= V:
            return
        emb = nn.Embedding(new_size, H, device=old.device, dtype=old.dtype)
        emb.weight[:V] = old
        emb.weight[V:] = old.float().mean(0).to(old.dtype)
        self.model.embed_tokens = emb
        if self.lm_head is not None:
            oh = self.lm_head.weight
            head = nn.Linear(H, new_size, bias=False, device=oh.device, dtype=oh.dtype)
            head.weight[:V] = oh
            head.weight[V:] = oh.float().mean(0).to(oh.dtype)
            self.lm_head = head
        self.config.vocab_size = new_size

    @torch.no_grad()
    def untie_head(self) -> None:
        """Give the head its own copy of the embedding (PRefLexOR untied Llama-3.2-3B so that LoRA on `embed_tokens`
        and on `lm_head` are separate deltas; preflexor.md §3.5)."""
        if self.lm_head is not None:
            return
        w = self.model.embed_tokens.weight
        self.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        self.lm_head.weight.copy_(w)
        self.config.tie_word_embeddings = False

    # -- KV cache ----------------------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> None:
        p = self.model.embed_tokens.weight
        dtype, device = dtype or p.dtype, device or p.device
        cfg = self.config
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim,
                                               dtype, device)
        self.max_cache_len = max_seq_len

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.max_cache_len = 0

    def kv_caches(self) -> list[KVCache]:
        return [layer.self_attn.kv_cache for layer in self.model.layers]

    # -- forward -----------------------------------------------------------------------------------------------
    def rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | SharedPrompt | None = None,
                return_hidden: bool = False):
        """input_ids (B, T) -> logits (B, T, V), or final-norm hidden states (B, T, H) with `return_hidden`.

        input_pos (T,): KV-cache slots to write (enables the cache); position_ids (B, T): RoPE positions (default
        input_pos, else 0..T-1); attn_mask (B, 1, T, S) bool, True = attend (default causal over the T tokens, which
        with a cache requires the caller's mask over the S cache slots), or a `SharedPrompt` layout of one packed row
        of answers and the prompts they continue (B = 1, position_ids required; `train.response_token_logps` runs a
        pair's prompt once for both answers this way).
        """
        B, T = input_ids.shape
        if isinstance(attn_mask, SharedPrompt) and (B != 1 or position_ids is None or attn_mask.length != T):
            raise ValueError(f"a SharedPrompt of {attn_mask.length} tokens needs input_ids (1, {attn_mask.length}) "
                             "and position_ids")
        if position_ids is None:
            position_ids = (input_pos if input_pos is not None else torch.arange(T, device=input_ids.device))
            position_ids = position_ids.unsqueeze(0).expand(B, T)
        if input_pos is not None and attn_mask is None:
            # Causal over cache slots: query at slot p sees slots <= p.
            S = self.max_cache_len
            attn_mask = (torch.arange(S, device=input_ids.device)[None, :] <= input_pos[:, None])[None, None]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, input_pos, attn_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, input_pos, attn_mask)
        x = self.model.norm(x)
        if not return_hidden:
            x = F.linear(x, self.head_weight(), self.head_bias())
        return x
