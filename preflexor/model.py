"""The reference Llama-family decoder (Llama 3.x, SmolLM2, Qwen2) in plain PyTorch.

Module names are Hugging Face's `LlamaForCausalLM` ones (`model.layers.{i}.self_attn.q_proj.weight`, ...) and RoPE
uses the same half-split (`rotate_half`) layout, so HF safetensors load with `strict=True` and no mapping table. The
model returns logits, or the final hidden states for the chunked log-prob path (which never forms the full logits).
Generation uses a preallocated KV cache indexed by position. Everything here is the textbook computation; the speed
paths (preflexor/fast/) are installed from outside by swapping modules for subclasses with the same parameters.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
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
    def from_hf(cls, cfg: dict | str | Path) -> "ModelArgs":
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
        kind = rope_scaling.get("rope_type", rope_scaling.get("type")) if isinstance(rope_scaling, dict) else None
        kw["rope_scaling"] = rope_scaling if kind not in (None, "default") else None
        if "rope_theta" not in cfg and isinstance(rope_scaling, dict) and "rope_theta" in rope_scaling:
            kw["rope_theta"] = rope_scaling["rope_theta"]  # transformers 5 keeps theta in rope_parameters
        extra = {k: v for k, v in cfg.items() if k not in known and k not in ("rope_parameters",)}
        return cls(**kw, extra=extra)

    def to_hf(self) -> dict:
        d = asdict(self)
        out = {**d.pop("extra"), **{k: v for k, v in d.items() if v is not None}}
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
        # Normalise in float32, then cast back (as the Llama reference does).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelArgs) -> torch.Tensor:
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
    """x * cos + rotate_half(x) * sin; under autocast the product is in the wider type, as the Llama reference does."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def attention(q, k, v, attn_mask=None):
    """SDPA over (B, nh, T, D) queries and (B, nkv, S, D) keys/values, causal when attn_mask is None. Grouped-query
    attention: each kv head serves nh/nkv query heads, so k and v are repeated to nh heads."""
    n_head, n_kv = q.shape[1], k.shape[1]
    if n_kv != n_head:
        k = k.repeat_interleave(n_head // n_kv, dim=1)  # (B, nh, S, D)
        v = v.repeat_interleave(n_head // n_kv, dim=1)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Attention(nn.Module):
    def __init__(self, cfg: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(H, self.n_head * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, self.n_kv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, self.n_kv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * D, H, bias=cfg.attention_bias and cfg.model_type != "qwen2")
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos=None, attn_mask=None):
        """x (B, T, H), cos/sin (B, T, D); attn_mask (B, 1, T, S) bool, True = attend, None = causal."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, D)
            if attn_mask is not None:  # the caller's mask may cover only the slots in use
                k, v = k[:, :, :attn_mask.shape[-1]], v[:, :, :attn_mask.shape[-1]]
        y = attention(q, k, v, attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, H)


class MLP(nn.Module):
    def __init__(self, cfg: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArgs):
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
    def __init__(self, cfg: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """`LlamaForCausalLM`-compatible decoder: `model.*` holds the stack, `lm_head` exists only when untied."""

    def __init__(self, cfg: ModelArgs):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False
        self.max_cache_len = 0

    # -- weights -----------------------------------------------------------------------------------------------
    def _head(self) -> nn.Module:
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

    def head_weight(self) -> torch.Tensor:
        """The output projection [V, H] as a tensor (LoRA / trainable-row wrappers expose `effective_weight`)."""
        head = self._head()
        return head.effective_weight() if hasattr(head, "effective_weight") else head.weight

    def head_parts(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The head without its LoRA as (constant [V, H], row ids [K], trainable rows [K, H]) when new-token rows
        train (`lora.train_new_token_rows`), else (matrix, None, None); see logprobs.py."""
        head = self._head()
        return head.head_parts() if hasattr(head, "head_parts") else (head.weight, None, None)

    def head_lowrank(self) -> tuple | None:
        """The head's LoRA (A [r, H], B [V, r], scale), kept apart from `head_parts()`, or None."""
        head = self._head()
        return head.lowrank() if hasattr(head, "lowrank") else None

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., H) -> logits (..., V); an adapted head applies its LoRA to x instead of folding it into W."""
        head = self._head()
        return head.project_out(x) if hasattr(head, "project_out") else F.linear(x, head.weight, self.head_bias())

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
                position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                return_hidden: bool = False):
        """input_ids (B, T) -> logits (B, T, V), or final-norm hidden states (B, T, H) with `return_hidden`.

        input_pos (T,): KV-cache slots to write (enables the cache); position_ids (B, T): RoPE positions (default
        input_pos, else 0..T-1); attn_mask (B, 1, T, S) bool, True = attend (default causal over the T tokens, which
        with a cache requires the caller's mask over the S cache slots). The mask is handed to every attention module
        as it is, so an installed fast attention may take a layout object there instead (fast/packed.py).
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = (input_pos if input_pos is not None else torch.arange(T, device=input_ids.device))
            position_ids = position_ids.unsqueeze(0).expand(B, T)
        if input_pos is not None and attn_mask is None:
            # Causal over cache slots: query at slot p sees slots <= p.
            S = self.max_cache_len
            attn_mask = (torch.arange(S, device=input_ids.device)[None, :] <= input_pos[:, None])[None, None]
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, input_pos, attn_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, input_pos, attn_mask)
        x = self.model.norm(x)
        if not return_hidden:
            x = self.head_logits(x)  # (B, T, V)
        return x
