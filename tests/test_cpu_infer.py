"""The fast CPU generation path (`cpu_infer`) against the plain model path: the same greedy tokens and the same
logits within 1e-4 at every step, for both weight layouts (one row: transposed; several: oneDNN-packed), ragged and
unpadded batches, q/k/v biases (Qwen2), LoRA on every target with trainable new-token rows (tied and untied head),
and weights that change between two generations."""
from __future__ import annotations

import copy

import pytest
import torch

import preflexor.sampler as sampler
from preflexor import fast
from preflexor.fast import cpu_infer
from preflexor.checkpoint import load_model
from preflexor.lora import PROJECTIONS, apply_lora, disable_lora, lora_parameters, merge_lora, train_new_token_rows
from preflexor.sampler import generate, generate_ex

RAGGED = [[5, 17, 99, 3, 42, 8, 77], [11, 12], [64, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 120], [7]]
SAME_LEN = [[5, 17, 99, 3], [11, 12, 13, 14]]
ATOL, RTOL = 2e-4, 1e-4  # float32, different GEMM kernels (oneDNN, MKL, OpenBLAS) and summation orders


@pytest.fixture(scope="module")
def models(hf_tiny_model, tmp_path_factory):
    """{"llama": ours, "qwen2": ours} loaded from random transformers models (qwen2 has q/k/v biases), with the fast
    paths installed; "plain_llama" without them."""
    out = {}
    for kind in ("llama", "qwen2"):
        d = tmp_path_factory.mktemp(f"tiny_fast_{kind}")
        hf_tiny_model(kind, seed=4).save_pretrained(d)
        out[kind] = fast.install(load_model(d))
        if kind == "llama":
            out["plain_llama"] = load_model(d)
    return out


def run_recording(monkeypatch, model, prompts, fast: bool, **kw):
    """generate_ex, also returning the float32 logits (R, V) that each step sampled from."""
    seen = []
    real = sampler.sample_logits
    monkeypatch.setattr(sampler, "sample_logits", lambda logits, *a: seen.append(logits.clone()) or real(logits, *a))
    res = generate_ex(model, prompts, kw.pop("max_new_tokens", 8), fast=fast, **kw)
    monkeypatch.setattr(sampler, "sample_logits", real)
    return res, seen


def assert_same_run(monkeypatch, model, prompts, **kw):
    """Fast and plain runs give identical tokens and finish reasons, and logits within ATOL at every step."""
    plain, want = run_recording(monkeypatch, model, prompts, False, **dict(kw))
    fast, got = run_recording(monkeypatch, model, prompts, True, **dict(kw))
    assert (fast.tokens, fast.finish_reasons) == (plain.tokens, plain.finish_reasons)
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {step}: {m}")
    return fast


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("prompts", [RAGGED, SAME_LEN, RAGGED[:1]], ids=["ragged", "unpadded", "one_row"])
def test_fast_path_equals_plain_path(monkeypatch, models, kind, prompts):
    model = models[kind]
    assert_same_run(monkeypatch, model, prompts, max_new_tokens=10)
    layout = cpu_infer.packed(model, len(prompts)).kind
    assert layout == ("t" if len(prompts) == 1 else "mkldnn")


@pytest.mark.parametrize("gemv", ["numpy", "torch"])
def test_one_row_matmul_backends(monkeypatch, models, gemv):
    """With one torch thread a one-row generation runs its matmuls through numpy's BLAS (held to one thread);
    `fast.install(model, numpy_blas=False)` keeps torch's. Both equal the plain path."""
    pytest.importorskip("threadpoolctl")
    if gemv == "torch":
        monkeypatch.setattr(models["qwen2"], "numpy_blas", False)
    calls = []
    real = cpu_infer.np.matmul
    monkeypatch.setattr(cpu_infer.np, "matmul", lambda *a: calls.append(1) or real(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_same_run(monkeypatch, models["qwen2"], RAGGED[2:3], max_new_tokens=6)
    finally:
        torch.set_num_threads(threads)
    layers = models["qwen2"].config.num_hidden_layers
    assert len(calls) == (5 * (4 * layers + 1) + 1 if gemv == "numpy" else 0)  # 5 decode steps, prefill head


def test_fast_path_sampling_and_early_stops_equal_plain_path(monkeypatch, models):
    """Seeded sampling with N samples per prompt, and rows dropped from the batch when they stop."""
    model = models["llama"]
    kw = dict(temperature=1.0, top_k=20, top_p=0.9, num_samples=2, seed=5, max_new_tokens=12)
    free = generate(model, RAGGED, 12, temperature=1.0, top_k=20, top_p=0.9, num_samples=2, seed=5, fast=False)
    res = assert_same_run(monkeypatch, model, RAGGED, stop_ids=[free[0][0][3], free[3][1][6]], **kw)
    assert {"stop", "length"} <= {w for ws in res.finish_reasons for w in ws}


def lora_model(base, tied: bool):
    """A copy of `base` with 4 new tokens (trainable rows) and LoRA on every target, all adapters randomised so
    each one changes the logits."""
    model = copy.deepcopy(base)
    if not tied:
        model.untie_head()
    V = model.config.vocab_size
    model.resize_vocab(V + 4)
    apply_lora(model, r=4, alpha=8, targets=PROJECTIONS + ("embed_tokens", "lm_head"))
    train_new_token_rows(model, range(V, V + 4))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.3)
        model.model.embed_tokens.new_rows.normal_(0, 0.5)
        if not tied:
            model.lm_head.new_rows.normal_(0, 0.5)
    return model, V


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fast_path_with_lora_and_new_token_rows(monkeypatch, models, tied):
    model, V = lora_model(models["llama"], tied)
    prompts = [[5, V, 17, V + 2, 99], [V + 1, 3], [V + 3]]
    res = assert_same_run(monkeypatch, model, prompts, max_new_tokens=10)
    assert_same_run(monkeypatch, model, prompts[:1], max_new_tokens=10)
    with disable_lora(model):  # the DPO/EXO reference: adapters skipped, new rows kept
        off = assert_same_run(monkeypatch, model, prompts, max_new_tokens=10)
    assert off.tokens != res.tokens  # the adapters matter, so the two checks above test different weights


def test_weight_changes_between_generations_are_picked_up(monkeypatch, models):
    model, V = lora_model(models["llama"], tied=True)
    prompts = [[5, V, 17], [V + 1, 3, 3, 9]]
    before = generate(model, prompts, 10, fast=True)
    assert cpu_infer.packed(model, 2) is cpu_infer.packed(model, 2)  # unchanged weights: the pack is reused
    # an optimizer step on the adapters (as in the active loop between two generations)
    opt = torch.optim.AdamW(lora_parameters(model) + [model.model.embed_tokens.new_rows], lr=0.05)
    model.train()
    loss = model(torch.tensor(prompts[1:]))[..., :V].logsumexp(-1).sum()
    loss.backward()
    opt.step()
    model.eval()
    after = assert_same_run(monkeypatch, model, prompts, max_new_tokens=10)
    assert after.tokens != before
    merge_lora(model)  # adapters folded into plain modules: new parameters, new pack
    assert_same_run(monkeypatch, model, prompts, max_new_tokens=10)
    merged = generate(model, prompts, 10)
    with torch.no_grad():  # base weights updated in place
        model.model.layers[1].mlp.down_proj.weight.neg_()
        model.lm_head.weight[:, :8].mul_(1.5)
    assert assert_same_run(monkeypatch, model, prompts, max_new_tokens=10).tokens != merged
    assert_same_run(monkeypatch, model, prompts[:1], max_new_tokens=10)
    assert set(cpu_infer._packs[model]) == {"t", "mkldnn"}
    with torch.no_grad():
        model.model.norm.weight.mul_(1.1)
    generate(model, prompts[:1], 2)
    assert set(cpu_infer._packs[model]) == {"t"}  # the stale oneDNN copy was dropped, not kept beside the new one


def test_default_switch(monkeypatch, models):
    """On by default for a float32 CPU model with the fast paths installed; an uninstalled model (`fast: false`, or
    PREFLEXOR_FAST=0 at install time) or fast=False keep the plain path."""
    model, plain = models["llama"], models["plain_llama"]
    calls = []
    real = cpu_infer.packed
    monkeypatch.setattr(cpu_infer, "packed", lambda m, rows: calls.append(rows) or real(m, rows))
    want = generate(model, RAGGED, 6, fast=False)
    assert calls == []
    assert generate(model, RAGGED, 6) == want and calls == [len(RAGGED)]
    monkeypatch.setenv(fast.ENV, "0")
    assert fast.install(plain) is plain and not fast.installed(plain)
    assert generate(plain, RAGGED, 6) == want and calls == [len(RAGGED)]
    assert generate(model, RAGGED, 6, fast=True) == want and calls == [len(RAGGED)] * 2
    with pytest.raises(ValueError, match="fast=True"):
        generate_ex(model, RAGGED, 6, fast=True, compile=True)
    with pytest.raises(ValueError, match="fast=True"):
        generate(copy.deepcopy(model).to(torch.bfloat16), RAGGED, 6, fast=True)
    cpu_infer.release(model)
    assert model not in cpu_infer._packs
