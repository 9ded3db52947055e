"""The batched KV-cache sampler: greedy parity with transformers' `generate`, ragged batches equal single prompts,
exact top-k/top-p filters, seeded reproducible sampling, N samples from one prefill, per-row stopping."""
from __future__ import annotations

import pytest
import torch

from preflexor.checkpoint import load_model, load_tokenizer
from preflexor.sampler import (apply_top_k, apply_top_p, generate, generate_ex, sample_logits)

PROMPTS = [[5, 17, 99, 3, 42, 8, 77], [11, 12], [64, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 120], [7]]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt, all n tokens (no eos stop)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, eos_token_id=None, pad_token_id=0, temperature=None, top_p=None,
                          top_k=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny(hf_tiny_model, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained dir with strict keys)."""
    hf = hf_tiny_model("llama", seed=1)
    d = tmp_path_factory.mktemp("tiny_sampler")
    hf.save_pretrained(d)
    return hf, load_model(d)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_equals_transformers_and_ragged_batch_equals_alone(hf_tiny_model, tmp_path, kind):
    hf = hf_tiny_model(kind, seed=2)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    batch = generate(ours, PROMPTS, 32)
    for p, got in zip(PROMPTS, batch):
        ref = hf_greedy(hf, p, 32)
        assert got[0] == ref  # in a ragged batch (left-padded)
        assert generate(ours, [p], 32)[0][0] == ref  # alone


def test_greedy_equals_transformers_on_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours, tok = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    chats = ["What is spider silk made of?", "Name three properties of bone.",
             "Write one sentence about collagen fibrils and their hierarchical structure in tendon."]
    prompts = [tok.encode_chat([{"role": "user", "content": c}]) for c in chats]
    assert len({len(p) for p in prompts}) == 3  # ragged
    batch = generate(ours, prompts, 32, pad_id=tok.pad_id)
    for i, p in enumerate(prompts):
        ref = hf_greedy(hf, p, 32)
        assert batch[i][0] == ref, f"prompt {i}: {tok.decode(batch[i][0])!r} != {tok.decode(ref)!r}"
    assert generate(ours, [prompts[0]], 32)[0][0] == batch[0][0]


def test_top_k_keeps_exactly_the_k_largest_and_ties_like_transformers():
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, -2.0, 4.0],
                           [0.0, 0.0, 0.0, 0.0, 9.0, -9.0]])
    kept = torch.isfinite(apply_top_k(logits, 3))
    assert kept.tolist() == [[False, True, True, True, False, True],  # 3.0 ties with the 3rd largest: both stay
                             [True, True, True, True, True, False]]
    for k in (1, 2, 3, 5, 6, 10):
        ref = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(apply_top_k(logits, k), ref)
    assert torch.equal(apply_top_k(logits, None), logits) and torch.equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_smallest_set_reaching_p_like_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper

    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.97, 0.01, 0.01, 0.01]])
    logits = probs.log()
    expect = {0.3: [[False, True, False, False], [True, False, False, False]],
              0.75: [[False, True, False, True], [True, False, False, False]],
              0.9: [[False, True, True, True], [True, False, False, False]],
              0.995: [[True, True, True, True], [True, True, True, True]],
              1e-6: [[False, True, False, False], [True, False, False, False]]}  # always at least one
    for p, want in expect.items():
        got = apply_top_p(logits, p)
        assert torch.isfinite(got).tolist() == want, p
        assert torch.equal(got, TopPLogitsWarper(p)(None, logits.clone())), p
    torch.manual_seed(0)
    rand = torch.randn(16, 300) * 3
    for p in (0.1, 0.5, 0.9, 0.95):
        assert torch.equal(apply_top_p(rand, p), TopPLogitsWarper(p)(None, rand.clone()))


@pytest.mark.parametrize("top_k, top_p, expect", [
    (None, None, [0.05, 0.5, 0.15, 0.3]),
    (2, None, [0, 0.5 / 0.8, 0, 0.3 / 0.8]),
    (None, 0.9, [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]),
    (3, 0.7, [0, 0.5 / 0.8, 0, 0.3 / 0.8]),
])
def test_sample_logits_draws_from_the_filtered_distribution(top_k, top_p, expect):
    """20k draws at temperature 1: filtered-out tokens never appear, kept ones at their renormalised probability
    (tolerance 0.015, about 5 standard errors)."""
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log().expand(20000, 4)
    torch.manual_seed(0)
    freq = torch.bincount(sample_logits(logits, 1.0, top_k, top_p), minlength=4).float() / 20000
    for f, e in zip(freq.tolist(), expect):
        assert (f == 0) if e == 0 else abs(f - e) < 0.015


def test_sample_logits_ties_at_kth_value_keep_all_tied():
    logits = torch.tensor([[3.0, 3.0, 3.0, 0.0, -1.0]]).expand(3000, 5)
    torch.manual_seed(0)
    counts = torch.bincount(sample_logits(logits, 1.0, top_k=2), minlength=5)
    assert counts[3:].sum() == 0 and (counts[:3] > 800).all()  # all three tied tokens, about 1/3 each
    assert sample_logits(torch.tensor([[0.1, 2.0, -1.0]]), 0.0).tolist() == [1]  # temperature 0: argmax


def test_seeded_sampling_is_reproducible_and_num_samples_share_one_prefill(tiny):
    _, model = tiny
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    prefill_batches = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: prefill_batches.append(args[0].shape[0]) if args[0].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        four = generate(model, PROMPTS, 16, num_samples=4, seed=123, **kw)
    finally:
        hook.remove()
    assert prefill_batches == [len(PROMPTS)]  # one prefill of the B prompts, not B * 4
    assert generate(model, PROMPTS, 16, num_samples=4, seed=123, **kw) == four  # reproducible
    for j in range(4):  # sample j == a separate run seeded 123 + j
        assert [s[0] for s in generate(model, PROMPTS, 16, seed=123 + j, **kw)] == [s[j] for s in four]
    assert len({tuple(s) for s in four[0]}) == 4  # the samples differ
    alone = generate(model, [PROMPTS[2]], 16, num_samples=4, seed=123, **kw)[0]
    assert alone == four[2]  # sampling is independent of the batch composition too
    seeds = generate(model, PROMPTS[:2], 16, seed=[7, 9], **kw)  # one seed per prompt
    assert seeds[1][0] == generate(model, [PROMPTS[1]], 16, seed=9, **kw)[0][0]
    assert generate(model, PROMPTS[:1], 16, seed=124, **kw) != generate(model, PROMPTS[:1], 16, seed=123, **kw)


def test_stop_ids_end_only_their_row(tiny):
    _, model = tiny
    free = generate_ex(model, PROMPTS, 12)
    assert all(r == ["length"] for r in free.finish_reasons)
    stop = free.tokens[0][0][4]  # the 5th token of prompt 0's greedy answer
    res = generate_ex(model, PROMPTS, 12, stop_ids=[stop])
    for i, (full, got, why) in enumerate(zip(free.tokens, res.tokens, res.finish_reasons)):
        cut = full[0].index(stop) if stop in full[0] else None
        assert got[0] == full[0][:cut]  # stop token excluded; the others keep going
        assert why == ["stop" if cut is not None else "length"]
    assert len(res.tokens[0][0]) == free.tokens[0][0].index(stop) <= 4
    assert res.prompt_tokens == [len(p) for p in PROMPTS]
    assert res.completion_tokens == sum(len(t[0]) for t in res.tokens)


def test_per_prompt_limits_on_token_callback_and_model_state(tiny):
    _, model = tiny
    model.train()
    res = generate_ex(model, PROMPTS[:3], [3, 0, 7])
    assert [len(t[0]) for t in res.tokens] == [3, 0, 7] and res.finish_reasons == [["length"]] * 3
    assert model.training and all(c is None for c in model.kv_caches())  # mode restored, cache freed
    model.eval()
    seen = []
    res = generate_ex(model, PROMPTS[:2], 10, num_samples=2, temperature=1.0, seed=0,
                      on_token=lambda row, t: seen.append((row, t)) or (row == 1 and len(seen) > 3))
    assert res.finish_reasons[0] == ["length", "stop"] and len(res.tokens[0][1]) < 10  # row 1 = prompt 0 sample 1
    assert [t for r, t in seen if r == 2] == res.tokens[1][0]  # rows are prompt * num_samples + sample
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 10**6]], 4)
    assert generate(model, [], 4) == []


def test_rows_kept_in_a_fixed_batch_give_the_same_tokens(tiny, monkeypatch):
    """With compile=True (CUDA) finished rows stay in the batch so its shape is fixed; run that path on CPU with the
    eager step and check it gives what dropping finished rows gives."""
    import preflexor.sampler as sampler

    _, model = tiny
    kw = dict(temperature=1.0, top_k=10, num_samples=2, seed=3)
    free = generate(model, PROMPTS, 12, **kw)
    stop = [free[0][0][2], free[2][1][5]]
    want = generate_ex(model, PROMPTS, 12, stop_ids=stop, **kw)
    assert {"stop", "length"} <= {w for ws in want.finish_reasons for w in ws}
    monkeypatch.setattr(sampler, "_decode_step_fn", lambda compile, device: sampler.decode_one_token)
    got = generate_ex(model, PROMPTS, 12, stop_ids=stop, compile=True, **kw)
    assert (got.tokens, got.finish_reasons) == (want.tokens, want.finish_reasons)
