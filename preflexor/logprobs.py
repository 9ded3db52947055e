"""Per-token and per-sequence log-probs of labels under the LM head, without materialising [tokens, vocab] logits.

The losses need only log p(y_t), but the eager route (hidden @ W.T, log_softmax, gather) holds several [N, V] float32
tensors: 0.4 GB each for 2k tokens of SmolLM2 (V=49152), 2.1 GB for 4k tokens of Llama-3.2 (V=128256).
`token_logps` walks the tokens in chunks instead (the fused-linear design of Liger's FLCE and CCE,
reference/losses.md §2.3-2.4): the forward keeps one float32 logsumexp per token, the backward recomputes each
chunk's logits and turns them in place into d logp / d logits = onehot - softmax, so beyond the inputs and their
gradients peak memory is one [chunk, V] block (`token_logps_reference` is the plain path the tests hold it to). A
head whose only trainable part is a few rows (stage 1's new thinking tokens, `lora.py`) is passed as a constant W
plus `rows`/`row_weight`: the forward keeps the [N, K] columns of (onehot - softmax) at those rows, and their
[K, H] gradient is one small product, with no [V, H] gradient anywhere. Labels are not shifted here: `labels[i]`
is the token predicted from `hidden[i]` (the caller shifts once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from preflexor.fast import kernels, matmul

CHUNK_BYTES = 512 * 2**20  # cap on one float32 [chunk, V] logits block: 1040 tokens at V=128256, 2728 at V=49152
MIN_CHUNK = 256  # rows below which large-H matmuls lose efficiency (bench/RESULTS_loss_head.md)


def default_chunk_size(n_tokens: int, vocab_size: int, device: torch.device | None = None) -> int:
    """Tokens per chunk: at most CHUNK_BYTES of float32 logits, a multiple of 8. On the CPU also a quarter of the
    batch (so the logits held at once are at most 1/4 of the full [N, V]) but at least MIN_CHUNK rows for matmul
    efficiency; on CUDA the byte cap alone (larger GEMMs, fewer launches)."""
    by_bytes = max(8, CHUNK_BYTES // (4 * vocab_size) // 8 * 8)
    if device is not None and device.type == "cuda":
        return max(1, min(n_tokens, by_bytes))
    quarter = max(MIN_CHUNK, -(-n_tokens // 32) * 8)  # ceil(N / 4), rounded up to a multiple of 8
    return max(1, min(n_tokens, by_bytes, quarter))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32; float64 stays float64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _resolve_impl(impl: str | None, device: torch.device) -> str:
    impl = impl or "auto"
    if impl not in ("auto", "torch", "triton", "plain"):
        raise ValueError(f"logprobs impl must be auto|torch|triton|plain, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and kernels.available() else "torch"
    if impl == "triton" and not kernels.available():
        raise ValueError("logprobs impl 'triton' requested but triton is not installed")
    return impl


def _lse_logp_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, unit_grad: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Torch twin of kernels.lse_and_logp: (logsumexp [n], label log-prob [n], optional onehot - softmax [n, V]),
    in place on `logits` (the caller's temporary) so one [n, V] float32 block is live at a time."""
    x = logits.to(_acc_dtype(logits.dtype))  # [n, V]; a copy only for half-precision logits
    valid = labels != ignore_index
    picked = x.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)  # [n]
    m = x.amax(dim=1, keepdim=True)  # [n, 1]
    total = x.sub_(m).exp_().sum(dim=1)  # [n]; x now holds exp(logits - m)
    lse = total.log().add_(m.squeeze(1))
    logp = torch.where(valid, picked - lse, 0.0)
    if not unit_grad:
        return lse, logp, None
    scale = valid.to(x.dtype)
    x.mul_((-scale / total)[:, None])  # [n, V] -softmax in one pass (0 on ignored rows)
    rows = torch.arange(x.shape[0], device=x.device)
    return lse, logp, x.index_put_((rows, torch.where(valid, labels, 0)), scale, accumulate=True)


def _softmax_grad_(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                   ignore_index: int) -> torch.Tensor:
    """Torch twin of kernels.softmax_grad_: scale * (onehot - softmax) from the saved lse, zero rows where ignored."""
    valid = labels != ignore_index
    scale = torch.where(valid, scale.to(lse.dtype), 0.0)  # [n], 0 on ignored rows
    p = logits.to(lse.dtype).sub_(lse[:, None]).exp_()  # [n, V] softmax, in place for float32 logits
    p.mul_(-scale[:, None])
    rows = torch.arange(p.shape[0], device=p.device)
    return p.index_put_((rows, torch.where(valid, labels, 0)), scale, accumulate=True)


class _ChunkedTokenLogps(torch.autograd.Function):
    """logp[i] = (h[i] @ W.T)[y_i] - logsumexp(h[i] @ W.T), chunked over tokens. When only `hidden` needs a
    gradient (a frozen head, as under LoRA), the forward also stores (onehot - softmax) @ W per token ([N, H]):
    d logp_i / d h_i depends on the upstream gradient only through the row scale grad_out[i], so the backward is one
    multiply with no logits recomputed. With `rows` [K] and their values `row_weight` [K, H] (W constant, holding
    them), d logp_i / d W[rows] = (onehot - softmax)_i[rows] outer h_i: the forward keeps those [N, K] columns and
    the backward forms sum_i grad_out[i] * (...) as a [K, N] x [N, H] product, chunk by chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, impl, precompute_grad_hidden,
                rows=None, row_weight=None, cols=None, col_weight=None):
        N = hidden.shape[0]
        use_triton, linear = impl == "triton", F.linear if impl == "plain" else matmul.linear
        w = weight.to(hidden.dtype)  # the matmul runs in the activations' dtype (bf16 under autocast-style use)
        lse = torch.empty(N, dtype=_acc_dtype(hidden.dtype), device=hidden.device)
        out = torch.empty_like(lse)
        generic = cols is not None  # a low-rank head term: every gradient in a backward that recomputes the logits
        unit = not generic and (precompute_grad_hidden or rows is not None)  # onehot - softmax in the forward
        precompute_grad_hidden = precompute_grad_hidden and not generic
        grad_hidden_unit = torch.empty_like(hidden) if precompute_grad_hidden else None
        grad_rows_unit = None if rows is None or generic else torch.empty(N, rows.shape[0], dtype=lse.dtype,
                                                                          device=lse.device)
        for s in range(0, N, chunk_size):
            h, y = hidden[s:s + chunk_size], labels[s:s + chunk_size]
            logits = _logits(linear, h, w, cols, col_weight, s, chunk_size)  # [n, V]
            if use_triton:
                lse_c, logp_c = kernels.lse_and_logp(logits, y, ignore_index)
                g = kernels.softmax_grad_(logits, y, lse_c, torch.ones_like(lse_c), ignore_index) if unit else None
            else:
                lse_c, logp_c, g = _lse_logp_(logits, y, ignore_index, unit_grad=unit)
            lse[s:s + chunk_size], out[s:s + chunk_size] = lse_c, logp_c
            if grad_rows_unit is not None:
                grad_rows_unit[s:s + chunk_size] = g[:, rows]  # [n, K] columns of the trained rows
            if precompute_grad_hidden:
                grad_hidden_unit[s:s + chunk_size] = linear(g.to(w.dtype), w.t())  # (onehot - softmax) @ W
            del logits, g  # free this [n, V] block before the next chunk's matmul allocates one
        ctx.ignore_index, ctx.chunk_size, ctx.impl = ignore_index, chunk_size, impl
        ctx.precomputed, ctx.has_rows, ctx.generic = precompute_grad_hidden, rows is not None, generic
        ctx.row_dtype = None if row_weight is None else row_weight.dtype
        if generic:
            ctx.save_for_backward(hidden, weight, labels, lse, rows, cols, col_weight)
        elif rows is not None:
            ctx.save_for_backward(grad_hidden_unit, grad_rows_unit, hidden)
        elif precompute_grad_hidden:
            ctx.save_for_backward(grad_hidden_unit)
        else:
            ctx.save_for_backward(hidden, weight, labels, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.generic:
            return _ChunkedTokenLogps._backward_generic(ctx, grad_out)
        if ctx.has_rows:
            return _ChunkedTokenLogps._backward_rows(ctx, grad_out)
        if ctx.precomputed:
            (grad_hidden_unit,) = ctx.saved_tensors
            grad_hidden = grad_hidden_unit * grad_out[:, None].to(grad_hidden_unit.dtype)
            return grad_hidden, None, None, None, None, None, None, None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        linear = F.linear if ctx.impl == "plain" else matmul.linear
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        # at least float32 accumulation across chunks; written straight into the result when W is fp32
        grad_w = torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if need_w else None
        c = ctx.chunk_size
        for s in range(0, hidden.shape[0], c):
            h, y = hidden[s:s + c], labels[s:s + c]
            g = _chunk_grad(linear(h, w), y, lse[s:s + c], grad_out[s:s + c], ctx.ignore_index,
                            ctx.impl == "triton")  # [n, V]: float32 (torch), the logits' dtype (triton)
            if need_w:  # into the float32 accumulator directly: no [V, H] half-precision product per chunk
                grad_w.addmm_(g.t().to(grad_w.dtype), h.to(grad_w.dtype))
            if need_h:
                grad_hidden[s:s + c] = linear(g.to(w.dtype), w.t())
            del g  # free this [n, V] block before the next chunk's matmul allocates one
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_hidden, grad_w, None, None, None, None, None, None, None, None, None

    @staticmethod
    def _backward_generic(ctx, grad_out):
        """The head with a low-rank term, logits = h W^T + c C^T (c = scale * h A^T [N, r], C = B [V, r]): the
        logits are recomputed chunk by chunk, g = d logp / d logits, and every requested gradient is formed from g:
        h (g W), c (g C), C (g^T c), W (g^T h) and trained rows (g[:, rows]^T h), the weights' in float32."""
        hidden, weight, labels, lse, rows, cols, col_weight = ctx.saved_tensors
        linear = F.linear if ctx.impl == "plain" else matmul.linear
        need_h, need_w, need_rows, need_c, need_cw = (ctx.needs_input_grad[i] for i in (0, 1, 8, 9, 10))
        w, cw = weight.to(hidden.dtype), col_weight.to(hidden.dtype)
        acc = _acc_dtype(hidden.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_c = torch.empty_like(cols) if need_c else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_cw = torch.zeros(col_weight.shape, dtype=acc, device=weight.device) if need_cw else None
        grad_rows = torch.zeros(rows.shape[0], hidden.shape[1], dtype=acc, device=weight.device) if need_rows else None
        c = ctx.chunk_size
        for s in range(0, hidden.shape[0], c):
            h = hidden[s:s + c]
            g = _chunk_grad(_logits(linear, h, w, cols, cw, s, c), labels[s:s + c], lse[s:s + c], grad_out[s:s + c],
                            ctx.ignore_index, ctx.impl == "triton")  # [n, V]
            g32 = g.to(acc)
            if need_w:
                grad_w.addmm_(g32.t(), h.to(acc))
            if need_rows:
                grad_rows.addmm_(g32[:, rows].t(), h.to(acc))
            if need_cw:
                grad_cw.addmm_(g32.t(), cols[s:s + c].to(acc))
            gh = g.to(w.dtype)
            if need_h:
                grad_h[s:s + c] = linear(gh, w.t())
            if need_c:
                grad_c[s:s + c] = gh @ cw
            del g, g32, gh
        cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
        return (grad_h, cast(grad_w, weight), None, None, None, None, None, None,
                None if grad_rows is None else grad_rows.to(ctx.row_dtype), grad_c, cast(grad_cw, col_weight))

    @staticmethod
    def _backward_rows(ctx, grad_out):
        """Hidden gradient from the stored unit gradient (None when hidden is constant); row gradient
        sum_i grad_out[i] * G[i, rows] outer h_i, accumulated in float32 (float64 for float64 inputs)."""
        grad_hidden_unit, grad_rows_unit, hidden = ctx.saved_tensors
        grad_hidden = grad_rows = None
        if grad_hidden_unit is not None:
            grad_hidden = grad_hidden_unit * grad_out[:, None].to(grad_hidden_unit.dtype)
        if ctx.needs_input_grad[8]:
            scaled = grad_rows_unit * grad_out[:, None].to(grad_rows_unit.dtype)  # [N, K]
            grad_rows = torch.zeros(scaled.shape[1], hidden.shape[1], dtype=scaled.dtype, device=scaled.device)
            c = ctx.chunk_size
            for s in range(0, hidden.shape[0], c):  # [K, n] x [n, H]; a float32 copy of one hidden chunk at most
                grad_rows.addmm_(scaled[s:s + c].t(), hidden[s:s + c].to(scaled.dtype))
            grad_rows = grad_rows.to(ctx.row_dtype)
        return grad_hidden, None, None, None, None, None, None, None, grad_rows, None, None


def _logits(linear, h, w, cols, col_weight, start, n) -> torch.Tensor:
    """One chunk's logits [n, V] = h W^T (oneDNN for float32 on the CPU unless plain), plus c C^T for a low-rank
    head term (the head's LoRA: never folded into W, where a bf16 W would round its small deltas away)."""
    logits = linear(h, w)
    if cols is not None:
        logits.addmm_(cols[start:start + n].to(logits.dtype), col_weight.t().to(logits.dtype))
    return logits


def _chunk_grad(logits, labels, lse, scale, ignore_index, use_triton):
    """d logp / d logits for one chunk, scaled per row by the upstream gradient."""
    if use_triton:
        return kernels.softmax_grad_(logits, labels, lse, scale.float(), ignore_index)
    return _softmax_grad_(logits, labels, lse, scale, ignore_index)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                chunk_size: int | None = None, impl: str | None = None, rows: torch.Tensor | None = None,
                row_weight: torch.Tensor | None = None, lowrank: tuple | None = None) -> torch.Tensor:
    """Log-prob of each label under softmax(hidden @ weight.T), 0.0 where labels == ignore_index; a tensor of labels'
    shape, float32 (float64 for float64 inputs, which gradcheck uses).

    Args:
        hidden: [N, H] or [B, T, H] final hidden states (after the last norm).
        weight: [V, H] LM-head weight (gradient optional: skipped when it does not require grad).
        labels: hidden's leading shape; the token predicted from each hidden row (already shifted).
        chunk_size: tokens per chunk; None picks `default_chunk_size` (512 MiB of logits at most).
        impl: "torch" (chunked PyTorch, oneDNN GEMMs on the CPU), "plain" (chunked PyTorch, `F.linear`: the model
            has no fast paths installed), "triton" (fast/kernels.py; CUDA, or CPU under TRITON_INTERPRET=1),
            "auto" (default) = triton on CUDA when installed, else torch.
        rows, row_weight: a head whose only trainable part is rows `rows` ([K] distinct token ids) with values
            `row_weight` [K, H] (e.g. `Transformer.head_parts()`). `weight` is then a constant that already holds
            those values; the result and the gradients of hidden and row_weight equal those of
            `weight.index_put((rows,), row_weight)` as the head, but take the frozen-head path plus a [K, H] product.
        lowrank: (A [r, H], B [V, r], scale): the head's LoRA as a term on the hidden states, logits = h W^T +
            scale (h A^T) B^T (`Transformer.head_lowrank()`), with gradients for A and B; `weight` then holds no
            LoRA delta. Combines with rows.
    """
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"token_logps: hidden {tuple(hidden.shape)} must be [..., H] and weight "
                         f"{tuple(weight.shape)} [V, H] with the same H")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"token_logps: labels {tuple(labels.shape)} must match hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"token_logps: chunk_size must be >= 1, got {chunk_size}")
    if (rows is None) != (row_weight is None):
        raise ValueError("token_logps: rows and row_weight go together (both or neither)")
    if rows is not None:
        rows = _check_rows(weight, rows, row_weight)
    impl = _resolve_impl(impl, hidden.device)
    # an out-of-range label would make the Triton kernels read out of bounds silently; check once, up front
    if bool(((labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))).any()):
        raise ValueError(f"token_logps: labels must be in [0, {weight.shape[0]}) or {ignore_index}")
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # [N, H]
    y = labels.reshape(-1).long()  # [N]
    chunk = chunk_size or default_chunk_size(h2.shape[0], weight.shape[0], h2.device)
    row_grad = rows is not None and torch.is_grad_enabled() and row_weight.requires_grad
    grad_on = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or row_grad)
    precompute = grad_on and hidden.requires_grad and not weight.requires_grad
    if not row_grad:  # constant rows: `weight` already holds them, the plain path is exact
        rows = row_weight = None
    cols = col_weight = None
    if lowrank is not None:
        a, b, scale = lowrank
        if a.dim() != 2 or a.shape[1] != weight.shape[1] or tuple(b.shape) != (weight.shape[0], a.shape[0]):
            raise ValueError(f"token_logps: lowrank A {tuple(a.shape)} and B {tuple(b.shape)} must be [r, H] and "
                             f"[V, r] for weight {tuple(weight.shape)}")
        cols, col_weight = F.linear(h2, a.to(h2.dtype)) * scale, b  # [N, r]: autograd carries h's and A's gradients
    out = _ChunkedTokenLogps.apply(h2, weight, y, ignore_index, chunk, impl, precompute, rows, row_weight, cols,
                                   col_weight)
    return out.view(labels.shape)


def _check_rows(weight: torch.Tensor, rows: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """Validate the rows decomposition; returns rows as int64. `weight` must be constant and hold the rows' values,
    else its hidden gradient (which includes the rows) and the logits would use stale rows silently."""
    V, H = weight.shape
    if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
        raise ValueError(f"token_logps: rows must be a 1-D integer tensor of token ids, got {rows.dtype} "
                         f"{tuple(rows.shape)}")
    if row_weight.dim() != 2 or tuple(row_weight.shape) != (rows.shape[0], H) or not row_weight.is_floating_point():
        raise ValueError(f"token_logps: row_weight {row_weight.dtype} {tuple(row_weight.shape)} must be a floating "
                         f"[K, H] = [{rows.shape[0]}, {H}] tensor (one row per id in rows)")
    if rows.device != weight.device or row_weight.device != weight.device:
        raise ValueError(f"token_logps: weight ({weight.device}), rows ({rows.device}) and row_weight "
                         f"({row_weight.device}) must be on one device")
    if weight.requires_grad:
        raise ValueError("token_logps: with rows, weight is a constant (pass weight.detach(); its trainable part "
                         "is row_weight)")
    rows = rows.long()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= V):
        raise ValueError(f"token_logps: rows must be token ids in [0, {V}), got {rows.tolist()}")
    if torch.unique(rows).numel() != rows.numel():
        raise ValueError(f"token_logps: rows must be distinct, got {rows.tolist()}")
    if not torch.equal(weight[rows], row_weight.detach().to(weight.dtype)):
        raise ValueError("token_logps: weight[rows] differs from row_weight (weight must already hold the rows' "
                         "current values, e.g. rows_weight().detach())")
    return rows


def token_logps_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int = -100) -> torch.Tensor:
    """The eager path: full logits (matmul in the inputs' dtype, then at least float32), log_softmax, gather."""
    logits = (hidden @ weight.to(hidden.dtype).t()).to(_acc_dtype(hidden.dtype))  # [..., V]
    valid = labels != ignore_index
    logp = torch.log_softmax(logits, dim=-1).gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, 0.0)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """Sum (average=False; DPO/EXO) or mean (average=True; IPO, ORPO) of token log-probs [B, T] where mask [B, T]
    != 0, as [B] float32 (float64 for float64 input). Extra masks (response-only, thinking hidden) fold into `mask`;
    the mean divides by the count clamped to >= 1, so a fully masked row gives 0.0, not 0/0 (TRL #1473)."""
    if token_logps.dim() != 2 or mask.shape != token_logps.shape:
        raise ValueError(f"sequence_logps: token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} "
                         "must both be [B, T]")
    keep = mask != 0
    total = torch.where(keep, token_logps.to(_acc_dtype(token_logps.dtype)), 0.0).sum(dim=1)  # [B]
    return total / keep.sum(dim=1).clamp(min=1).to(total.dtype) if average else total
