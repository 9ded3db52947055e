"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for models that do not fit one device per rank: `train.fsdp: true`.

    model = fsdp.shard(model, rt)                 # after LoRA and the fast paths are installed
    with fsdp.gathered(model): generate(...)      # generation, held-out checks, saving: whole weights on every rank

Every decoder layer is one FSDP unit and the root (embedding, final norm, head) another, so a rank holds 1/world of
every weight between uses; a layer's weights are all-gathered for its forward and again for its backward, and the
gradients are reduce-scattered and averaged over ranks (so the training loop skips its own all-reduce). The root
stays gathered after its forward (FSDP2 does not reshard the root), which is what lets the loss head read
`model.head_parts()` outside a module forward. The frozen base and the trainable adapters share units; with a
bf16/fp16 base the fp32 adapters are cast to the base dtype for compute (`MixedPrecisionPolicy`) and the gradients
reduced in fp32, while AdamW updates the fp32 shards.

Generation is not sharded: a sharded forward is a collective, so ranks would have to decode in lockstep. `gathered`
all-gathers the whole model on every rank once (as TRL does for ZeRO-3 generation), so each rank samples its own
share of prompts without collectives, then frees the copies. That needs the weights (not the optimizer state or the
activations) to fit one device: 3B in bf16 is 6 GiB.

Checkpoints stay unsharded and rank-independent: `full_state` gathers the trainable tensors and `optimizer_state` the
AdamW moments (keyed by parameter name) on every rank, rank 0 writes them; `load_trainable` and
`load_optimizer_state` put a full tensor back into each rank's shard (tests/test_fsdp.py: a resume equals the run
without the interruption). The files do not depend on the world size; resuming under another one is not tested.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn


def shard(model: nn.Module, rt) -> nn.Module:
    """Shard `model` in place over the run's ranks (layers, then the root); returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world,))
    base = model.model.embed_tokens.weight.dtype
    mp = MixedPrecisionPolicy(param_dtype=base, reduce_dtype=torch.float32) if base != torch.float32 else \
        MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # The CPU decoder's numpy GEMVs would pin the gathered weights' storage (numpy views make it non-resizable),
    # and FSDP frees that storage when it reshards.
    model.numpy_blas = False
    return model


def sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """The whole model on every rank inside the block (a collective on entry and exit; a no-op unsharded): forwards
    need no collectives, so ranks may run different numbers of them (each generating its share)."""
    if not sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    layers = [m for m in units if m is not model]  # the root never reshards after its forward anyway
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    try:
        yield model
    finally:
        from preflexor.fast import cpu_infer

        cpu_infer.release(model)  # its pack holds views of the gathered weights
        for m in units:
            m.reshard()
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()`; for a sharded model inside `gathered`, its whole tensors (FSDP2's state-dict hooks
    would return the shards, and a merge done inside `gathered` lives only in the whole tensors)."""
    if not sharded(model):
        return model.state_dict()
    sd = dict(model.named_parameters())
    for name, mod in model.named_modules():
        for b, t in mod._buffers.items():
            if t is not None and b not in mod._non_persistent_buffers_set:
                sd[f"{name}.{b}" if name else b] = t
    return sd


def full(t: torch.Tensor) -> torch.Tensor:
    """A parameter, gradient or state tensor as one whole tensor (a collective for a sharded one)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole, on the CPU (every rank calls it under FSDP)."""
    return {n: full(p.detach()).contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into `param` (into this rank's shard of it when sharded; no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """AdamW's state, whole and keyed by parameter name (every rank calls it; each gets the whole state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Put a whole, name-keyed optimizer state (`optimizer_state`) back, each rank keeping its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """`clip_grad_norm_` for plain or sharded gradients; the total norm as a float."""
    return float(full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
