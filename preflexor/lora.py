"""LoRA for the Llama `Transformer`: adapters, trainable new-token rows, merge, and the adapter-disabled reference
(adapter files in PEFT's format: peft_io.py).

LoRA (Hu et al. 2021, Eq. 3): h = W0 x + (alpha/r) B A x with A Kaiming-uniform and B zero, so the adapted model is
the base model at step 0; rsLoRA scales by alpha/sqrt(r). The wrappers keep the base `weight`/`bias` names, so base
state-dict keys are unchanged and adapters are extra keys. PRefLexOR stage 1 (paper §3.3) also targets
`embed_tokens` and `lm_head`, since the new thinking tokens need trained rows, in two ways that combine: LoRA on the
embedding/head (PEFT's convention: embedding A [r, V] zero, B [H, r] normal, no dropout) and `train_new_token_rows`,
which trains exactly the new tokens' rows (PEFT's "trainable tokens"). In a tied model the head LoRA is a separate
delta on the shared matrix, as in PEFT, so merging unties the head (paper §3.5: the released checkpoints are untied).
`disable_lora` is the DPO/EXO reference (STYLE §20): LoRA branches skipped, no second copy of the weights; the
trainable new-token rows stay in effect (they are part of the stage-1 model that stage 2 starts from).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from preflexor.errors import UserError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = PROJECTIONS + ("embed_tokens", "lm_head")
LORA_NAMES = ("lora_a", "lora_b", "head_lora_a", "head_lora_b")  # adapter parameter names, besides `new_rows`


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """Trainable tensors over a bf16/fp16 base are float32 (PEFT's default too): AdamW's updates below half a bf16
    ulp would round away (at stage 2's lr 5e-7 LoRA A would never move); the GEMMs still run in the activations'
    dtype (bf16 under autocast)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """alpha/r (LoRA), or alpha/sqrt(r) (rsLoRA, which keeps the update size stable as r grows)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class _Adapted(nn.Module):
    """What both wrappers share: the frozen base `weight`, optional trainable rows, `disabled`/`merged` flags."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        weight.requires_grad_(False)
        self.weight = weight
        self.disabled = False  # skip LoRA branches (the reference model); new rows stay in effect
        self.merged = False
        self.register_parameter("new_rows", None)  # [n, H] values of the trainable rows
        self.register_buffer("row_ids", None, persistent=False)  # (n,) sorted token ids
        self.register_buffer("row_index", None, persistent=False)  # (V,) position in new_rows, -1 elsewhere

    @torch.no_grad()
    def set_trainable_rows(self, ids: torch.Tensor) -> None:
        """Train rows `ids` of `weight` (adding to rows already trained): they become a parameter initialised from
        their current values; the other rows stay frozen and bit-identical."""
        if self.merged:
            raise RuntimeError("cannot add trainable rows to a merged module")
        device = self.weight.device
        old = self.row_ids if self.row_ids is not None else torch.empty(0, dtype=torch.long, device=device)
        ids = torch.unique(torch.cat([old, ids.to(device)]))  # sorted, deduplicated
        values = self.weight[ids].to(adapter_dtype(self.weight.dtype))
        if self.new_rows is not None:  # rows trained already keep their (float32) values
            at = self.row_index[ids]
            values[at >= 0] = self.new_rows[at[at >= 0]].to(values.dtype)
        index = torch.full((self.weight.shape[0],), -1, dtype=torch.long, device=device)
        index[ids] = torch.arange(len(ids), device=device)
        self.new_rows = nn.Parameter(values)
        self.row_ids, self.row_index = ids, index

    def rows_weight(self) -> torch.Tensor:
        """`weight` with the trainable rows written in (differentiable w.r.t. the rows only)."""
        if self.new_rows is None or self.merged:
            return self.weight
        return self.weight.index_put((self.row_ids,), self.new_rows.to(self.weight.dtype))

    def head_parts(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This matrix as the LM head without its LoRA (that is `lowrank()`), split for `logprobs.token_logps`:
        (constant `rows_weight()`, `row_ids`, `new_rows`) when trainable rows train over a frozen base, else
        (`rows_weight()`, None, None). The split trains the rows without forming a [V, H] gradient."""
        if self.new_rows is None or self.merged or not self.new_rows.requires_grad or self.weight.requires_grad:
            return self.rows_weight(), None, None
        with torch.no_grad():
            weight = self.rows_weight()  # a [V, H] copy; the base stays untouched
        return weight, self.row_ids, self.new_rows

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The head's active LoRA as (A [r, H], B [V, r], scale), applied to the hidden states (logits = h W^T +
        scale (h A^T) B^T) rather than folded into a [V, H] matrix, where a bf16 base rounds its small deltas away."""
        return None

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., H) -> logits (..., V) with this matrix as the head: rows written in, LoRA as the low-rank term."""
        y = F.linear(x, self.rows_weight(), getattr(self, "bias", None))
        lr = self.lowrank()
        if lr is not None:
            a, b, scale = lr
            y = y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * scale
        return y

    @property
    def active(self) -> bool:
        return self.lora_a is not None and not self.disabled and not self.merged



def _lora_pair(r: int, fan_in: int, fan_out: int, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """A [r, in] Kaiming-uniform(a=sqrt(5)) (nn.Linear's init, as in LoRA and PEFT) and B [out, r] zero."""
    dtype = adapter_dtype(like.dtype)
    a = torch.empty(r, fan_in, device=like.device, dtype=dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(a), nn.Parameter(torch.zeros(fan_out, r, device=like.device, dtype=dtype))


def _merged(w: torch.Tensor, b: torch.Tensor | None, a: torch.Tensor | None, scale: float, transpose=False):
    """W + scale * B A in float32, cast back to W's dtype (so a bf16 merge rounds once)."""
    if a is None:
        return w.detach().clone()
    delta = b.detach().float() @ a.detach().float()  # (out, in)
    return (w.detach().float() + scale * (delta.T if transpose else delta)).to(w.dtype)


class LoRALinear(_Adapted):
    """y = x W^T + b + scale * B A drop(x); `weight`/`bias` are the frozen base module's own parameters. With r == 0
    there is no LoRA branch (an untied head that only trains new-token rows)."""

    def __init__(self, base: nn.Linear, r: int = 0, alpha: float = 1.0, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base.weight)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.register_parameter("lora_a", None)
        self.register_parameter("lora_b", None)
        self.r, self.alpha, self.rslora, self.scale, self.dropout = 0, 0.0, False, 0.0, nn.Identity()
        if r > 0:
            self.add_lora(r, alpha, dropout, rslora)

    def add_lora(self, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        self.lora_a, self.lora_b = _lora_pair(r, self.in_features, self.out_features, self.weight)
        self.r, self.alpha, self.rslora, self.scale = r, alpha, rslora, lora_scale(alpha, r, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.rows_weight(), self.bias)
        if self.active:  # dropout on the LoRA branch input only; float32 adapters run in x's dtype
            xd = self.dropout(x)
            y = y + F.linear(F.linear(xd, self.lora_a.to(xd.dtype)), self.lora_b.to(xd.dtype)) * self.scale
        return y

    def lowrank(self):  # as an untied head (which never runs `forward`, so its LoRA branch sees no dropout)
        return (self.lora_a, self.lora_b, self.scale) if self.active else None

    def effective_weight(self) -> torch.Tensor:
        """The adapted [out, in] matrix, LoRA folded in (the packed CPU decoder, float32)."""
        w = self.rows_weight()
        return w + ((self.lora_b @ self.lora_a) * self.scale).to(w.dtype) if self.active else w

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W (rows written in) + scale * B A, exactly once; afterwards the LoRA branch is skipped."""
        if self.merged:
            return
        self.weight.copy_(_merged(self.rows_weight(), self.lora_b, self.lora_a, self.scale))
        self.merged = True

    def to_plain(self) -> nn.Linear:
        """The merged weights as an `nn.Linear` (same Parameter objects, no copy)."""
        self.merge()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        return lin


class LoRAEmbedding(_Adapted):
    """Embedding with PEFT's LoRA: e = W[ids] + scale * (A^T[ids]) B^T, A [r, V] zero, B [H, r] normal, no dropout.
    In a tied model it also carries the head's separate LoRA (`head_lora_a` [r, H], `head_lora_b` [V, r]), because
    `Transformer.head_weight()` takes the tied head from `effective_weight()` here."""

    def __init__(self, base: nn.Embedding, r: int = 0, alpha: float = 1.0, rslora: bool = False):
        super().__init__(base.weight)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        for name in LORA_NAMES:
            self.register_parameter(name, None)
        self.r, self.alpha, self.rslora, self.scale = 0, 0.0, False, 0.0
        self.head_r, self.head_alpha, self.head_rslora, self.head_scale = 0, 0.0, False, 0.0
        if r > 0:
            self.add_lora(r, alpha, rslora)

    def add_lora(self, r: int, alpha: float, rslora: bool = False) -> None:
        w, dtype = self.weight, adapter_dtype(self.weight.dtype)
        self.lora_a = nn.Parameter(torch.zeros(r, self.num_embeddings, device=w.device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.randn(self.embedding_dim, r, device=w.device, dtype=dtype))
        self.r, self.alpha, self.rslora, self.scale = r, alpha, rslora, lora_scale(alpha, r, rslora)

    def add_head_lora(self, r: int, alpha: float, rslora: bool = False) -> None:
        """LoRA on the tied head (a linear H -> V over the shared matrix), separate from the embedding's own."""
        self.head_lora_a, self.head_lora_b = _lora_pair(r, self.embedding_dim, self.num_embeddings, self.weight)
        self.head_r, self.head_alpha, self.head_rslora = r, alpha, rslora
        self.head_scale = lora_scale(alpha, r, rslora)

    @property
    def head_active(self) -> bool:
        return self.head_lora_a is not None and not self.disabled and not self.merged

    def lowrank(self):
        return (self.head_lora_a, self.head_lora_b, self.head_scale) if self.head_active else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.weight)  # (B, T, H), the base path exactly as nn.Embedding computes it
        if self.new_rows is not None and not self.merged:
            slot = self.row_index[ids]  # (B, T) position in new_rows, -1 for other tokens
            rows = self.new_rows[slot.clamp(min=0)].to(x.dtype)  # (B, T, H)
            x = torch.where((slot >= 0).unsqueeze(-1), rows, x)
        if self.active:
            x = x + ((F.embedding(ids, self.lora_a.T) @ self.lora_b.T) * self.scale).to(x.dtype)  # (B, T, r) @ (r, H)
        return x

    def effective_weight(self) -> torch.Tensor:
        """The tied head's [V, H] matrix: the rows-updated weight plus the head's own LoRA delta (not the
        embedding's, matching PEFT, where the embedding LoRA touches only the input side)."""
        w = self.rows_weight()
        return w + ((self.head_lora_b @ self.head_lora_a) * self.head_scale).to(w.dtype) if self.head_active else w

    @torch.no_grad()
    def merged_head_weight(self) -> torch.Tensor:
        return _merged(self.rows_weight(), self.head_lora_b, self.head_lora_a, self.head_scale)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W (rows written in) + scale * (B A)^T, exactly once. A tied-head LoRA cannot share the merged matrix;
        `merge_lora(model)` unties the head first."""
        if self.merged:
            return
        if self.head_lora_a is not None:
            raise RuntimeError("the tied head has its own LoRA: use merge_lora(model), which unties the head")
        self.weight.copy_(_merged(self.rows_weight(), self.lora_b, self.lora_a, self.scale, transpose=True))
        self.merged = True

    def to_plain(self) -> nn.Embedding:
        self.merge()
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, device="meta")
        emb.weight = self.weight
        return emb


# -- applying, merging, disabling ------------------------------------------------------------------------------
def adapted_modules(model: nn.Module) -> list[tuple[str, _Adapted]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _Adapted)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _wrap_embedding(model: nn.Module) -> LoRAEmbedding:
    if not isinstance(model.model.embed_tokens, LoRAEmbedding):
        model.model.embed_tokens = LoRAEmbedding(model.model.embed_tokens)
    return model.model.embed_tokens


def _wrap_head(model: nn.Module) -> LoRALinear:
    if not isinstance(model.lm_head, LoRALinear):
        model.lm_head = LoRALinear(model.lm_head)
    return model.lm_head


def _is_adapter_param(name: str) -> bool:
    return name.rpartition(".")[2] in LORA_NAMES + ("new_rows",)


def freeze_base(model: nn.Module) -> None:
    """Only adapter parameters (LoRA pairs and new-token rows) keep requires_grad."""
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter_param(name))


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets: Iterable[str] = PROJECTIONS,
               rslora: bool = False) -> nn.Module:
    """Wrap the targeted modules of a `Transformer` in place (projections matched by module-name suffix, plus
    "embed_tokens" and "lm_head") and freeze every non-adapter parameter. Call after `resize_vocab` (and after
    `untie_head`, if wanted: on a tied model, "lm_head" gets its own delta on the shared matrix).

    Args:
        r: LoRA rank; alpha: scale numerator (scale = alpha/r, or alpha/sqrt(r) with `rslora`).
        dropout: on the LoRA branch input of the linear layers (PEFT applies none to embeddings).
        targets: a subset of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj embed_tokens lm_head.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    for t in targets:
        if t not in TARGETS:
            raise UserError(f"lora.targets: unknown target {t!r} (known: {', '.join(TARGETS)})")
    if not isinstance(r, int) or r <= 0:
        raise UserError(f"lora.r: must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"lora.dropout: must be in [0, 1), got {dropout!r}")
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] not in targets or name in ("lm_head", "model.embed_tokens"):
            continue
        if isinstance(module, LoRALinear):
            raise UserError(f"apply_lora: {name} already has LoRA (merge_lora the model first)")
        if isinstance(module, nn.Linear):
            _set_module(model, name, LoRALinear(module, r, alpha, dropout, rslora))
    if "embed_tokens" in targets:
        emb = _wrap_embedding(model)
        if emb.lora_a is not None:
            raise UserError("apply_lora: embed_tokens already has LoRA (merge_lora the model first)")
        emb.add_lora(r, alpha, rslora)
    if "lm_head" in targets:
        head = _wrap_embedding(model) if model.lm_head is None else _wrap_head(model)
        if (head.head_lora_a if model.lm_head is None else head.lora_a) is not None:
            raise UserError("apply_lora: lm_head already has LoRA (merge_lora the model first)")
        if model.lm_head is None:
            head.add_head_lora(r, alpha, rslora)
        else:
            head.add_lora(r, alpha, dropout, rslora)
    model.train(model.training)  # new dropout modules follow the model's train/eval mode
    freeze_base(model)
    return model


def train_new_token_rows(model: nn.Module, token_ids: Iterable[int]) -> nn.Module:
    """Make only rows `token_ids` of the embedding (and of an untied head; a tied head uses the same rows) trainable,
    the base matrices frozen. Call after `resize_vocab`; combines with LoRA on the embedding/head in either order."""
    ids = torch.as_tensor(sorted({int(i) for i in token_ids}), dtype=torch.long)
    V = model.model.embed_tokens.weight.shape[0]
    if len(ids) == 0:
        raise UserError("train_new_token_rows: no token ids given")
    if ids[0] < 0 or ids[-1] >= V:
        bad = int(ids[0] if ids[0] < 0 else ids[-1])
        raise UserError(f"train_new_token_rows: token id {bad} is outside the vocabulary (0..{V - 1})")
    _wrap_embedding(model).set_trainable_rows(ids)
    if model.lm_head is not None:
        _wrap_head(model).set_trainable_rows(ids)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + scale * B A, rows written in) and put plain `nn.Linear` /
    `nn.Embedding` modules back, so `checkpoint.save_model` writes an ordinary model. Idempotent. A tied model whose
    embedding or head got LoRA comes out untied: the two matrices now differ (paper §3.5)."""
    emb = model.model.embed_tokens
    if isinstance(emb, LoRAEmbedding) and model.lm_head is None and not emb.merged and (
            emb.lora_a is not None or emb.head_lora_a is not None):
        V, H = emb.weight.shape
        head = nn.Linear(H, V, bias=False, device="meta")
        head.weight = nn.Parameter(emb.merged_head_weight(), requires_grad=False)
        model.lm_head = head
        model.config.tie_word_embeddings = False
        emb.head_lora_a = emb.head_lora_b = None
    for name, module in adapted_modules(model):
        _set_module(model, name, module.to_plain())
    return model


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model computes exactly its base (LoRA branches skipped; trainable new rows kept): the DPO/EXO
    reference with no second copy of the weights."""
    mods = [m for _, m in adapted_modules(model)]
    if any(m.merged for m in mods):
        raise RuntimeError("disable_lora: adapters are merged into the weights, the base model is gone")
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d


# -- parameters and state ----------------------------------------------------------------------------------------
def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.rpartition(".")[2] in LORA_NAMES]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors under the model's own keys (`model.load_state_dict(sd, strict=False)` restores them)."""
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2] in LORA_NAMES}


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Restore `lora_state_dict` output into a model with the same LoRA layout (e.g. when resuming training)."""
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if k.rpartition(".")[2] in LORA_NAMES]
    if res.unexpected_keys or missing:  # only base weights may be absent from a LoRA state dict
        what = "unexpected" if res.unexpected_keys else "missing"
        raise UserError(f"LoRA state dict does not match the model: {what} key {(res.unexpected_keys or missing)[0]!r}")


def new_rows_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{name}.new_rows` [n, H] and `{name}.row_ids` (n,) for each module with trainable rows."""
    out = {}
    for name, m in adapted_modules(model):
        if m.new_rows is not None:
            out[f"{name}.new_rows"], out[f"{name}.row_ids"] = m.new_rows.detach(), m.row_ids
    return out


@torch.no_grad()
def load_new_rows(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Inverse of `new_rows_state_dict` (makes the rows trainable first when they are not yet)."""
    for key, ids in sd.items():
        if not key.endswith(".row_ids"):
            continue
        name = key[: -len(".row_ids")]
        if name not in ("model.embed_tokens", "lm_head") or (name == "lm_head" and model.lm_head is None):
            raise UserError(f"load_new_rows: key {key!r} names no embedding or untied head of this model")
        m = _wrap_embedding(model) if name == "model.embed_tokens" else _wrap_head(model)
        if int(ids.max()) >= m.weight.shape[0]:
            raise UserError(f"load_new_rows: {key} has token id {int(ids.max())} >= vocab size {m.weight.shape[0]}")
        m.set_trainable_rows(ids.to(torch.long))
        if not torch.equal(m.row_ids.cpu(), ids.cpu()):
            raise UserError(f"load_new_rows: {key} differs from the rows this model already trains")
        values = sd[f"{name}.new_rows"]
        if tuple(values.shape) != tuple(m.new_rows.shape):
            raise UserError(f"load_new_rows: {name}.new_rows has shape {tuple(values.shape)}, "
                            f"expected {tuple(m.new_rows.shape)}")
        m.new_rows.copy_(values)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable(model: nn.Module) -> str:
    t, n = count_trainable(model)
    line = f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / max(n, 1):.4f}"
    print(line)
    return line
