"""Parity of our Transformer (loaded by `checkpoint.load_model`) with transformers' Llama/Qwen2 on random tiny configs,
and cached vs uncached greedy decoding (STYLE.md 28, 29)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from preflexor.checkpoint import load_model

V = 128  # TINY_CONFIG vocab in conftest
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # head_dim 16, theta 5e5: wavelengths span all three bands

CASES = {
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "llama3-rope-untied": ("llama", dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama3-rope-tied": ("llama", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen2-bias-untied": ("qwen2", dict(tie_word_embeddings=False, rope_theta=10000.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path, hf_tiny_model):
    kind, overrides = CASES[case]
    ref = hf_tiny_model(kind, **overrides)
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.config.tie_word_embeddings == overrides["tie_word_embeddings"]
    assert (model.lm_head is None) == overrides["tie_word_embeddings"]
    assert model.config.attention_bias == (kind == "qwen2")
    if "rope_scaling" in overrides:
        assert model.config.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        logits = model(ids)
        hidden = model(ids, return_hidden=True)
    assert out.logits.std() > 0.5  # a real signal, not near-zero logits that any bug would still match
    assert_close(logits, out.logits, atol=1e-5, rtol=0)
    assert_close(hidden, out.hidden_states[-1], atol=1e-5, rtol=0)


def test_llama3_rope_scaling_changes_the_output(tmp_path, hf_tiny_model):
    """The rope-scaling case above can fail: without scaling the logits differ well beyond the tolerance."""
    ref = hf_tiny_model("llama", **CASES["llama3-rope-untied"][1])
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(cfg.get(key), dict):
            cfg[key] = {"rope_type": "default", "rope_theta": 500000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = torch.arange(40).remainder(V)[None]
    with torch.no_grad():
        diff = (load_model(tmp_path)(ids) - ref(ids).logits).abs().max()
    assert diff > 1e-2


def test_sharded_safetensors_load(tmp_path, hf_tiny_model):
    ref = hf_tiny_model("llama", tie_word_embeddings=False)
    ref.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    model = load_model(tmp_path)
    ids = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(model(ids), ref(ids).logits, atol=1e-5, rtol=0)


def test_meta_build_leaves_nothing_on_meta_and_respects_dtype(tmp_path, hf_tiny_model):
    hf_tiny_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert not any(t.is_meta for t in tensors.values())
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in model.parameters())
    assert model.inv_freq.dtype == torch.float32  # RoPE frequencies stay float32, as in HF
    with torch.no_grad():
        assert model(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.bfloat16


def greedy_uncached(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        nxt = model(ids)[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def greedy_cached(model, prompt: list[int], n: int) -> list[int]:
    """Prefill the prompt into the KV cache, then one token per step at `input_pos`."""
    T = len(prompt)
    model.setup_cache(1, T + n)
    try:
        logits = model(torch.tensor([prompt]), input_pos=torch.arange(T))
        out = [int(logits[0, -1].argmax())]
        for pos in range(T, T + n - 1):
            logits = model(torch.tensor([[out[-1]]]), input_pos=torch.tensor([pos]))
            out.append(int(logits[0, -1].argmax()))
        return out
    finally:
        model.clear_cache()


@pytest.mark.parametrize("case", ["llama-gqa-tied", "qwen2-bias-untied"])
def test_cached_and_uncached_greedy_decoding_agree(case, tmp_path, hf_tiny_model):
    kind, overrides = CASES[case]
    hf_tiny_model(kind, seed=3, **overrides).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    prompt = [5, 17, 99, 3, 64, 12, 7]
    with torch.no_grad():
        uncached = greedy_uncached(model, prompt, 20)
        cached = greedy_cached(model, prompt, 20)
    assert cached == uncached
    assert len(set(uncached)) > 3  # the continuation is not one repeated token


def test_rms_norm_backward_matches_autograd():
    """`fast.layers._RMSNormCPU` (hand-written backward, float32 on the CPU when training) == autograd through
    F.rms_norm: gradcheck in float64, and float32 values and gradients of x and a trainable weight."""
    from preflexor.fast.layers import FastRMSNorm, _RMSNormCPU

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormCPU.apply(a, b, 1e-5), (x, w))

    norm = FastRMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3, generator=g)
    x = (torch.randn(3, 5, 64, generator=g) * 4).requires_grad_()
    up = torch.randn(3, 5, 64, generator=g)
    y = norm(x)
    assert y.grad_fn.name() == "_RMSNormCPUBackward"
    gx, gw = torch.autograd.grad((y * up).sum(), (x, norm.weight))
    ref = torch.nn.functional.rms_norm(x, (64,), norm.weight, 1e-5)
    rx, rw = torch.autograd.grad((ref * up).sum(), (x, norm.weight))
    assert_close(y, ref, atol=0, rtol=0)  # the forward is F.rms_norm itself
    assert_close(gx, rx, atol=1e-6, rtol=1e-5)
    assert_close(gw, rw, atol=1e-5, rtol=1e-5)


def test_apply_rope_matches_the_rotate_half_formula():
    """`apply_rope` (one output written in halves, backward = rotation by -sin) == x cos + rotate_half(x) sin, values
    and gradients bit for bit, on a transposed (B, heads, T, D) view as the attention passes it; mixed dtypes take the
    formula."""
    from preflexor.fast.layers import _Rope, apply_rope
    from preflexor.model import rotate_half

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    c, s = torch.randn(3, 4, dtype=torch.float64, generator=g), torch.randn(3, 4, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda a: _Rope.apply(a, c, s), (x,))

    freqs = torch.arange(7.0)[:, None] * torch.rand(16, generator=g)  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # (1, 1, T, D)
    x = torch.randn(2, 7, 3, 32, generator=g).transpose(1, 2).requires_grad_()  # (B, heads, T, D) view
    up = torch.randn(2, 3, 7, 32, generator=g)
    y = apply_rope(x, cos, sin)
    ref = x * cos + rotate_half(x) * sin
    assert y.stride() == x.stride()
    assert_close(y, ref, atol=0, rtol=0)  # the formula's roundings, bit for bit (HF parity holds at 1e-5)
    assert_close(torch.autograd.grad((y * up).sum(), x)[0], torch.autograd.grad((ref * up).sum(), x)[0],
                 atol=0, rtol=0)
    xb = x.detach().bfloat16()
    assert_close(apply_rope(xb, cos, sin), (xb * cos + rotate_half(xb) * sin).bfloat16())


@pytest.mark.parametrize("tile", [2, 3, 64])
def test_tiled_attention_equals_sdpa_per_segment(monkeypatch, tile):
    """`_TiledAttention` (the CPU path: query tiles against only the keys they can see, softmax kept for the
    backward) == SDPA per segment with the full masks, values and q/k/v gradients: equal prompts (one broadcast mask),
    unequal prompts (padding keys masked), one merged block or one block per half, grouped-query heads; tiles of 2, 3
    and 64 positions (so one, several and ragged tiles)."""
    import preflexor.fast.shared_prompt as M
    from preflexor.fast.shared_prompt import SharedPrompt

    monkeypatch.setattr(M, "TILE_ROWS", tile)
    g = torch.Generator().manual_seed(0)
    layouts = [([(4, 5)], [[1, 1, 1], [1, 1, 1]]), ([(4, 5)], [[1, 1, 1], [1, 0, 0]]),
               ([(2, 7), (2, 3)], [[1, 1, 1], [1, 1, 0]]), ([(2, 7), (2, 3)], [[1, 1, 1], [1, 1, 1]]), ([(1, 4)], [[1, 1]])]
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        for blocks, keys in layouts:
            keys = torch.tensor(keys, dtype=torch.bool)
            T = sum(n * R for n, R in blocks) + keys.numel()
            q, k, v = (torch.randn(T, h, 8, generator=g, dtype=dtype).requires_grad_() for h in (6, 2, 2))
            up = torch.randn(T, 48, generator=g, dtype=dtype)
            outs = []
            for tiled in (True, False):
                y = SharedPrompt(blocks, keys, tiled=tiled).attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
                outs.append((y, *torch.autograd.grad((y * up).sum(), (q, k, v))))
            for a, b in zip(*outs):
                assert_close(a, b, atol=tol, rtol=tol)
    assert M._tiled_ok(torch.zeros(1)) and not M._tiled_ok(torch.zeros(1, dtype=torch.bfloat16))


def test_shared_prompt_layout_is_checked():
    """A `SharedPrompt` layout describes one packed row of an exact length; anything else is a ValueError."""
    from preflexor import fast
    from preflexor.fast.shared_prompt import SharedPrompt
    from preflexor.model import ModelArgs, Transformer

    model = fast.install(Transformer(ModelArgs(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=8)))
    layout = SharedPrompt([(4, 3)], torch.tensor([[True, True], [True, False]]))  # 4 answers of 3, 2 prompts of 2
    assert layout.length == 16 and layout.masks[0].shape == (4, 1, 3, 5)
    assert bool(layout.masks[0][1, 0, 0, 1]) is False and bool(layout.masks[0][2, 0, 0, 1]) is True  # i % 2 -> prompt
    ids, pos = torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long)
    assert model(ids, position_ids=pos, attn_mask=layout).shape == (1, 16, 32)
    bad = [(ids[:, :15], pos[:, :15]), (ids.expand(2, 16), pos.expand(2, 16)), (ids, None)]  # length, batch, no pos
    for i, p in bad:
        with pytest.raises(ValueError, match="SharedPrompt"):
            model(i, position_ids=p, attn_mask=layout)
