"""Speed paths, installed from outside the reference model by one call; `model.py` knows nothing of them.

    fast.install(model, cfg.model.fast)  # in the scripts; PREFLEXOR_FAST=0 or 1 overrides the config key

`install` swaps the reference modules for subclasses with the same parameters and state-dict keys (fast/layers.py:
RMSNorm backward, RoPE halves, fused LoRA projections, grouped k/v without copies, the shared-prompt attention) and
marks the model, so that the rest of the code takes the fast path for it:
- the preference forward runs a pair's prompt once, packed with both answers (fast/shared_prompt.py);
- the chunked log-prob head uses oneDNN on the CPU (fast/matmul.py) and the Triton kernels on CUDA (fast/kernels.py);
- the sampler decodes a float32 CPU model through repacked weights (fast/cpu_infer.py).
Every fast path is tested against the reference one it replaces; on an uninstalled model all of them are off.
"""
from __future__ import annotations

import os

import torch.nn as nn

ENV = "PREFLEXOR_FAST"  # "0" / "1": overrides the `fast` config key of every script


def install(model: nn.Module, on: bool = True, share_prompt: bool = True, numpy_blas: bool = True) -> nn.Module:
    """Install the speed paths into `model` in place when `on` (after $PREFLEXOR_FAST); returns the model.

    share_prompt: pack a pair's prompt once with its answers (False: one forward per half, for A/B timing).
    numpy_blas: batch-1 CPU decoding's one-row matmuls through numpy's BLAS (False: torch's)."""
    env = os.environ.get(ENV)
    if env not in (None, "", "0", "1"):
        raise ValueError(f"${ENV} must be 0 or 1, got {env!r}")
    if not (on if env in (None, "") else env == "1"):
        return model
    from preflexor.fast.layers import SWAPS

    for m in model.modules():
        if type(m) in SWAPS:
            m.__class__ = SWAPS[type(m)]  # a subclass: same parameters, buffers and state-dict keys
    model.share_prompt, model.numpy_blas = share_prompt, numpy_blas
    return model


def installed(model: nn.Module) -> bool:
    from preflexor.fast.layers import FastTransformer

    return isinstance(model, FastTransformer)
