"""The speed paths of preflexor/fast/ against the reference they replace: the whole installed model (logits and every
gradient, with LoRA and trained new-token rows, with and without checkpointing) equals the plain one, and the fused
LoRA Function equals the textbook LoRA forward. (The pieces have their own tests: test_model.py for the RMSNorm
backward, RoPE and the shared-prompt attention, test_matmul.py, test_kernels.py, test_cpu_infer.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from preflexor import fast
from preflexor.checkpoint import load_model
from preflexor.fast import matmul
from preflexor.fast.lora import project
from preflexor.lora import PROJECTIONS, LoRALinear, apply_lora, disable_lora, lora_parameters, train_new_token_rows
from preflexor.model import Transformer


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_installed_model_equals_the_reference(tmp_path, hf_tiny_model, kind, checkpointing):
    """`fast.install` swaps modules for subclasses with the same parameters: state-dict keys unchanged, logits and the
    gradient of every trainable tensor (LoRA on every projection, new-token rows) equal to the reference model's
    within float32 rounding, and the same with the adapters disabled (the DPO/EXO reference)."""
    hf_tiny_model(kind, seed=2).save_pretrained(tmp_path)
    plain = load_model(tmp_path)
    plain.resize_vocab(plain.config.vocab_size + 2)
    apply_lora(plain, r=4, alpha=8, targets=PROJECTIONS)
    train_new_token_rows(plain, [plain.config.vocab_size - 2, plain.config.vocab_size - 1])
    with torch.no_grad():
        for p in lora_parameters(plain):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    quick = fast.install(copy.deepcopy(plain))
    assert fast.installed(quick) and not fast.installed(plain) and type(plain) is Transformer
    assert list(quick.state_dict()) == list(plain.state_dict())
    assert {type(m).__name__ for m in quick.modules()} >= {"FastAttention", "FastMLP", "FastRMSNorm"}
    ids = torch.randint(0, plain.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    ids[:, 4] = plain.config.vocab_size - 1
    up = torch.randn(2, 19, plain.config.vocab_size, generator=torch.Generator().manual_seed(4))
    out = []
    for model in (quick, plain):
        model.train()
        model.gradient_checkpointing = checkpointing
        logits = model(ids)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad((logits * up).sum(), params)
        with torch.no_grad(), disable_lora(model):
            off = model(ids)
        out.append((logits, grads, off))
    (a, ga, oa), (b, gb, ob) = out
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oa, ob, atol=1e-5, rtol=1e-5)
    assert len(ga) == len(gb) == 2 * 7 * plain.config.num_hidden_layers + (1 if plain.lm_head is None else 2)
    for x, y in zip(ga, gb):  # float32 rounding, relative to each gradient's size (they reach ~100 here)
        torch.testing.assert_close(x, y, atol=1e-5 * float(y.abs().max()), rtol=1e-4)


def test_install_switch(monkeypatch, tmp_path, hf_tiny_model):
    """`on=False` or PREFLEXOR_FAST=0 leave the reference model as it is; PREFLEXOR_FAST=1 installs even when the
    config says no; any other value is an error naming the variable."""
    hf_tiny_model("llama").save_pretrained(tmp_path)
    assert not fast.installed(fast.install(load_model(tmp_path), on=False))
    monkeypatch.setenv(fast.ENV, "0")
    assert not fast.installed(fast.install(load_model(tmp_path)))
    monkeypatch.setenv(fast.ENV, "1")
    assert fast.installed(fast.install(load_model(tmp_path), on=False))
    monkeypatch.setenv(fast.ENV, "yes")
    with pytest.raises(ValueError, match=fast.ENV):
        fast.install(load_model(tmp_path))


def _plain_forward(module: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The textbook LoRA forward with autograd's own ops: x W^T + b + scale B A drop(x)."""
    y = F.linear(x, module.weight, module.bias)
    return y + F.linear(F.linear(module.dropout(x), module.lora_a), module.lora_b) * module.scale


@pytest.mark.parametrize("bias,dropout,shape", [(False, 0.0, (3, 10)), (True, 0.0, (2, 5, 7)), (True, 0.3, (4, 9))])
@pytest.mark.parametrize("onednn", ["1", "0"])
def test_fused_lora_linear_equals_plain_autograd(monkeypatch, bias, dropout, shape, onednn):
    """`_FrozenLoRA` (the CPU fp32 training path: one GEMM + addmm, its own backward) == the plain ops, output
    and the gradients of x, A and B (1e-5), with dropout drawn from the same seed; the frozen W gets none."""
    monkeypatch.setattr(matmul, "ONEDNN", onednn == "1")
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(48, 80, bias=bias), r=6, alpha=12, dropout=dropout).train()
    nn.init.normal_(m.lora_b, std=0.5)
    x = torch.randn(*shape, 48, requires_grad=True)
    w_out = torch.randn(*shape, 80)
    results = []
    for forward in (lambda t: project(t, m)[0], lambda t: _plain_forward(m, t)):
        torch.manual_seed(7)
        y = forward(x)
        grads = torch.autograd.grad((y * w_out).sum(), (x, m.lora_a, m.lora_b))
        results.append((y, grads, type(y.grad_fn).__name__))
    (y, grads, name), (y_ref, grads_ref, _) = results
    assert name == "_FrozenLoRABackward"
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    assert m.weight.grad is None


@pytest.mark.parametrize("dropouts", [(0.0, 0.0, 0.0), (0.0, 0.2, 0.0)])
def test_project_groups_modules_sharing_an_input(dropouts):
    """`project(x, q, k, v)`: modules of different widths, ranks, scales and biases in one `_FrozenLoRA` call (or,
    with a dropout among them, one call each) == each module's textbook forward; gradients of x and every A, B."""
    torch.manual_seed(0)
    mods = [LoRALinear(nn.Linear(40, out, bias=bias), r=r, alpha=alpha, dropout=p).train()
            for out, bias, r, alpha, p in zip((40, 24, 24), (True, False, True), (4, 6, 2), (8, 3, 2), dropouts)]
    for m in mods:
        nn.init.normal_(m.lora_b, std=0.5)
    x = torch.randn(2, 7, 40, requires_grad=True)
    params = [x] + [t for m in mods for t in (m.lora_a, m.lora_b)]
    weights = [torch.randn(2, 7, m.out_features) for m in mods]
    results = []
    for run in (lambda: project(x, *mods), lambda: [_plain_forward(m, x) for m in mods]):
        torch.manual_seed(5)
        ys = run()
        results.append((ys, torch.autograd.grad(sum((y * w).sum() for y, w in zip(ys, weights)), params)))
    (ys, grads), (ys_ref, grads_ref) = results
    grouped = len({y.grad_fn for y in ys}) == 1
    assert grouped == (max(dropouts) == 0.0)
    for a, b in zip(list(ys) + list(grads), list(ys_ref) + list(grads_ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_lora_linear_falls_back_where_it_does_not_apply():
    """A trainable base weight, or a disabled adapter, keeps the plain ops (same numbers as the textbook forward)."""
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(16, 8), r=2, alpha=4)
    x = torch.randn(3, 16, requires_grad=True)
    assert type(project(x, m)[0].grad_fn).__name__ == "_FrozenLoRABackward"
    m.weight.requires_grad_(True)
    y = project(x, m)[0]
    assert type(y.grad_fn).__name__ != "_FrozenLoRABackward"
    torch.testing.assert_close(y, _plain_forward(m, x))
    m.weight.requires_grad_(False)
    with disable_lora(m):
        torch.testing.assert_close(project(x, m)[0], F.linear(x, m.weight, m.bias), atol=1e-6, rtol=1e-6)


