"""Triton kernels for per-token log-probs over a chunk of logits (CUDA; CPU only under TRITON_INTERPRET=1).

`logprobs.token_logps` computes a chunk of logits with a torch matmul and hands it here:
- `lse_and_logp`: one program per row streams over the vocabulary in blocks, keeping an online max and sum-exp
  (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"), so the row's logsumexp and the label's
  log-prob come out in float32 from a single read of the logits, with no [n, V] log_softmax tensor.
- `softmax_grad_`: overwrites the logits chunk in place with d logp / d logits = scale * (onehot(label) - softmax),
  using the saved logsumexp; rows whose label is ignored become zeros. The caller then forms the hidden and
  weight gradients with two torch matmuls.
Triton is imported lazily: this module imports (and `available()` answers False) on machines without it.
The same design is used by Liger's fused linear cross-entropy and CCE (see reference/losses.md §2.3, §6).
"""
from __future__ import annotations

import functools
from contextlib import nullcontext

import torch

_MAX_BLOCK_V = 4096  # vocabulary elements per inner-loop step: a few KB of registers per program


def available() -> bool:
    """True when triton imports; the CUDA check is the caller's (`logprobs` dispatches on `tensor.is_cuda`)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    """Build the jitted kernels on first use, so TRITON_INTERPRET is read when a kernel is first needed."""
    import triton
    import triton.language as tl

    @triton.jit
    def lse_logp_kernel(logits_ptr, stride_row, labels_ptr, lse_ptr, logp_ptr, V, ignore_index,
                        BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        # per-lane running max and sum of exp(x - max); a finite floor instead of -inf keeps lanes that only ever
        # see padding (V < BLOCK_V) at s = 0 without evaluating -inf - -inf
        m = tl.full([BLOCK_V], -1e30, tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        m_row = tl.max(m, axis=0)
        s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
        lse = m_row + tl.log(s_row)
        tl.store(lse_ptr + row, lse)
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        safe = tl.where(valid, label, 0).to(tl.int64)
        x_label = tl.load(base + safe).to(tl.float32)
        tl.store(logp_ptr + row, tl.where(valid, x_label - lse, 0.0))

    @triton.jit
    def softmax_grad_kernel(logits_ptr, stride_row, labels_ptr, lse_ptr, scale_ptr, V, ignore_index,
                            BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        label = tl.load(labels_ptr + row)
        lse = tl.load(lse_ptr + row)
        scale = tl.where(label != ignore_index, tl.load(scale_ptr + row).to(tl.float32), 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            onehot = tl.where(offs == label, 1.0, 0.0)
            g = scale * (onehot - tl.exp(x - lse))
            tl.store(base + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)

    return lse_logp_kernel, softmax_grad_kernel


def _launch_args(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    import triton

    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a row-major [n, V] chunk, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits rows {logits.shape[0]}")
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(logits.shape[1]))
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


def on_device(t: torch.Tensor):
    """Launch on `t`'s GPU, not the current one (a model on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def lse_and_logp(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logsumexp [n], log-prob of the label [n], 0.0 where ignored), both float32, for logits [n, V]."""
    block_v, num_warps = _launch_args(logits, labels)
    n, V = logits.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        lse_logp_kernel, _ = _kernels()
        with on_device(logits):
            lse_logp_kernel[(n,)](logits, logits.stride(0), labels.contiguous(), lse, logp, V, ignore_index,
                                  BLOCK_V=block_v, num_warps=num_warps)
    return lse, logp


def softmax_grad_(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                  ignore_index: int = -100) -> torch.Tensor:
    """Overwrite logits [n, V] with scale[:, None] * (onehot(labels) - exp(logits - lse[:, None])); returns it.

    Rows with an ignored label become zero. `lse` must come from `lse_and_logp` on the same logits.
    """
    block_v, num_warps = _launch_args(logits, labels)
    n, V = logits.shape
    if n:
        _, softmax_grad_kernel = _kernels()
        with on_device(logits):
            softmax_grad_kernel[(n,)](logits, logits.stride(0), labels.contiguous(), lse.contiguous(),
                                      scale.contiguous(), V, ignore_index, BLOCK_V=block_v, num_warps=num_warps)
    return logits
