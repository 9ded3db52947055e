"""Fast CPU decoding: the model's weights repacked for the CPU matmul that suits the batch, and a lean decode step
over the sampler's KV cache. Same math as `model.Transformer.forward`; only float rounding differs (~1e-6). The
prefill stays the model's own forward (one call per generation); only its head uses the packed weight.

Why it pays (numbers in bench/RESULTS_generate.md): a decode step is ~200 small memory-bound matmuls plus ~1000 small
ops, and `F.linear(x, W)` with W stored [out, in] streams W poorly at batch 1 and runs a poor GEMM at batch 2-16.
- batch 1 ("t"): each weight stored transposed, [in, out] contiguous, so x @ W^T streams W once, row after row.
  With one torch thread these GEMVs go to numpy's BLAS (held to one thread with threadpoolctl), whose GEMV streams
  faster than MKL's on the CPUs measured; `fast.install(model, numpy_blas=False)` keeps torch's matmul.
- batch > 1 ("mkldnn"): oneDNN-prepacked weights (`torch.ops.mkldnn._reorder_linear_weight`).
- q/k/v and gate/up fused into one matrix each; RoPE applied to q and k in one pass; attention over the filled
  cache slots only, grouped-query attention by reshaping the queries (no copy of K/V per query head), and no mask
  when no row is left-padded.

LoRA deltas and trainable new-token rows are merged into the packed copy (`effective_weight`, `head_weight`). The
pack is cached per model and kind, keyed on every parameter's identity, storage and version counter (bumped by any
in-place update: an optimizer step, `copy_`, `merge`) and on the adapters' disabled/merged flags, so weights that
change between two generations (LoRA training in the active loop) are repacked before the next one. The cache holds
one extra copy of the weights per kind used; `release(model)` frees it.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

_MKLDNN_BATCH_HINT = 8  # oneDNN picks the packed layout for this many rows (bench/RESULTS_generate.md)

_packs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {kind: (key, Packed)}
_packs_guard = threading.Lock()


def available(model) -> bool:
    """True for a float32 model on the CPU with oneDNN (the case measured); bf16 and CUDA keep the plain path."""
    w = model.model.embed_tokens.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def default_on(model) -> bool:
    """What `generate_ex(fast=None)` uses: on for float32 CPU models with the fast paths installed (`fast.install`)."""
    from preflexor import fast

    return available(model) and fast.installed(model)


def _numpy_blas_limits(model):
    """threadpoolctl's limiter holding numpy's BLAS to one thread, or None (fall back to torch's matmul) when the
    model was installed with numpy_blas=False, torch runs several threads (their pools would compete), or
    threadpoolctl is absent."""
    if not getattr(model, "numpy_blas", True) or torch.get_num_threads() != 1:
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=1, user_api="blas")


def _kind(rows: int) -> str:
    return "t" if rows == 1 else "mkldnn"


def _weights_key(model) -> tuple:
    """Changes whenever any parameter is replaced, moved, or updated in place, or an adapter is disabled/merged."""
    params = tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())
    flags = tuple((name, getattr(m, "disabled", None), getattr(m, "merged", None))
                  for name, m in model.named_modules() if hasattr(m, "merged"))
    return params, flags


def _weight(module) -> torch.Tensor:
    """[out, in] weight with any LoRA delta and trainable rows applied (a plain `nn.Linear` has neither)."""
    return module.effective_weight() if hasattr(module, "effective_weight") else module.weight


def _bias(modules) -> torch.Tensor | None:
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else m.weight.new_zeros(m.out_features) for b, m in zip(biases, modules)])


class Packed:
    """The model's linear weights in one kind's layout ("t": transposed [in, out], except the down projection, whose
    [out, in] layout streams faster there; "mkldnn": oneDNN-packed), q/k/v and gate/up concatenated along the output
    dimension, and a decode step that reads and writes the model's KV caches."""

    def __init__(self, model, kind: str):
        cfg = model.config
        self.kind = kind
        self.numpy_gemv = False  # set by `session` while numpy's BLAS is held to one thread
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.hidden, self.inter, self.eps = cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = torch.cat([_weight(a.q_proj), _weight(a.k_proj), _weight(a.v_proj)])  # ((nh+2nkv)*D, H)
            gu = torch.cat([_weight(m.gate_proj), _weight(m.up_proj)])  # (2I, H)
            self.layers.append((layer.input_layernorm.weight, self._pack(qkv), _bias([a.q_proj, a.k_proj, a.v_proj]),
                                self._pack(_weight(a.o_proj)), a.o_proj.bias, layer.post_attention_layernorm.weight,
                                self._pack(gu), self._pack(_weight(m.down_proj), transpose=False)))
        self.final_norm = model.model.norm.weight
        self.head, self.head_bias = self._pack(model.head_weight()), model.head_bias()

    def _pack(self, w: torch.Tensor, transpose: bool = True) -> torch.Tensor:
        w = w.detach()
        if self.kind == "t":
            return w.t().contiguous() if transpose else w.contiguous().t()  # (in, out) in memory, or a view
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _MKLDNN_BATCH_HINT)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.numpy_gemv:  # zero-copy views both ways
            y = torch.from_numpy(np.matmul(x.numpy(), w.numpy()))
            return y if b is None else y + b
        if self.kind == "t":
            return torch.mm(x, w) if b is None else torch.addmm(b, x, w)
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden,), w, self.eps)  # float32 model: the same as model.RMSNorm

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (R, H) -> float32 logits (R, V) through the packed head."""
        return self._linear(hidden.contiguous(), self.head, self.head_bias).float()

    @torch.inference_mode()
    def decode(self, model, tokens: torch.Tensor, slot: int, position_ids: torch.Tensor,
               attn_mask: torch.Tensor | None) -> torch.Tensor:
        """One decode step: tokens (R, 1) written at cache `slot`, RoPE positions (R, 1), mask (R, 1, 1, >slot) bool
        or None (every filled slot visible) -> float32 logits (R, V). The model's KV caches are read and written."""
        R = tokens.size(0)
        nh, nkv, D, H, I = self.n_head, self.n_kv, self.head_dim, self.hidden, self.inter
        n = slot + 1  # filled slots after this step
        x = model.model.embed_tokens(tokens).view(R, H)  # (R, H)
        cos, sin = model.rope(position_ids, x.dtype)  # (R, 1, D)
        # rotate_half(x) * sin == roll(x, D/2) * [-sin_1, sin_2]: one roll instead of chunk, neg and cat
        sin = torch.cat([-sin[..., :D // 2], sin[..., D // 2:]], dim=-1)
        cos, sin = cos.view(R, 1, D), sin.view(R, 1, D)  # (R, 1, D), broadcast over heads
        mask = None
        if attn_mask is not None:  # additive form, (R, 1, 1, n)
            mask = torch.zeros(R, 1, 1, n, dtype=x.dtype).masked_fill_(~attn_mask[..., :n], float("-inf"))
        scale = D ** -0.5
        for (ln1, qkv_w, qkv_b, o_w, o_b, ln2, gu_w, down_w), layer in zip(self.layers, model.model.layers):
            cache = layer.self_attn.kv_cache
            qkv = self._linear(self._norm(x, ln1), qkv_w, qkv_b)  # (R, (nh+2nkv)*D)
            qk = qkv[:, :(nh + nkv) * D].view(R, nh + nkv, D)
            qk = qk * cos + qk.roll(D // 2, dims=-1) * sin  # (R, nh+nkv, D), RoPE on q and k at once
            cache.k[:, :, slot] = qk[:, nh:]  # (R, nkv, D)
            cache.v[:, :, slot] = qkv[:, (nh + nkv) * D:].view(R, nkv, D)
            k, v = cache.k[:, :, :n], cache.v[:, :, :n]  # (R, nkv, n, D): the filled slots only
            # query heads grouped under their kv head, (R, nkv, nh/nkv, D): no copy of K/V per query head
            q = qk[:, :nh].reshape(R, nkv, nh // nkv, D)
            att = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # (R, nkv, nh/nkv, n)
            if mask is not None:
                att += mask
            y = torch.matmul(att.softmax(dim=-1), v).reshape(R, nh * D)  # (R, nh*D)
            x = x + self._linear(y, o_w, o_b)
            gu = self._linear(self._norm(x, ln2), gu_w, None)  # (R, 2I)
            x = x + self._linear(F.silu(gu[:, :I]) * gu[:, I:], down_w, None)
        return self.logits(self._norm(x, self.final_norm))


def packed(model, rows: int) -> Packed:
    """The model's pack for generations that start with `rows` rows: built on first use, rebuilt after any weight
    change (see the module docstring)."""
    kind, key = _kind(rows), _weights_key(model)
    with _packs_guard:
        fresh = {k: v for k, v in _packs.get(model, {}).items() if v[0] == key}  # stale copies freed first
        _packs[model] = fresh
        if kind in fresh:
            return fresh[kind][1]
    with torch.inference_mode():
        pack = Packed(model, kind)
    with _packs_guard:
        _packs.setdefault(model, {})[kind] = (key, pack)
    return pack


@contextmanager
def session(model, rows: int) -> Iterator[Packed]:
    """The model's pack for one generation that starts with `rows` rows, with numpy's BLAS set up for its one-row
    matmuls when that applies (see the module docstring)."""
    pack = packed(model, rows)
    limits = _numpy_blas_limits(model) if pack.kind == "t" else None
    if limits is None:
        yield pack
        return
    with limits:
        pack.numpy_gemv = True
        try:
            yield pack
        finally:
            pack.numpy_gemv = False


def release(model) -> None:
    """Drop the model's packed weights (they are rebuilt on the next fast generation)."""
    with _packs_guard:
        _packs.pop(model, None)
