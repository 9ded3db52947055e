"""Checkpoints: the real SmolLM2-135M-Instruct from its packaged GGUF (parity with transformers, perplexity, greedy
chat), GGUF q/k un-permutation on tiny written files, save_model -> transformers round trips, and bad-input errors."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.testing import assert_close

from preflexor.checkpoint import (DEFAULT_MODEL, default_model_dir, load_model, load_model_and_tokenizer,
                                  load_tokenizer, save_model)
from preflexor.errors import UserError
from preflexor.tokenizer import REASONING_TOKENS

PARAGRAPH = ("Spider silk is a protein fibre spun by spiders. Its strength comes from beta-sheet nanocrystals embedded "
             "in an amorphous matrix of glycine-rich chains. Collagen, the main protein of bone and tendon, forms a "
             "triple helix that assembles into fibrils, which are then mineralised with hydroxyapatite.")


def nll_per_row(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood (nats) of each row."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none") \
        .view(ids.shape[0], -1).mean(1)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir), load_tokenizer(smollm2_dir)


# -- the real model ------------------------------------------------------------------------------------------------
def test_smollm2_matches_transformers_and_reads_biology(smollm2, smollm2_dir):
    """Our model on the GGUF-converted weights equals transformers' LlamaForCausalLM on the same directory; the
    paragraph is far more likely than its shuffled tokens (reference/offline-assets.md: ppl 27 vs NLL 9.6)."""
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert model.config.tie_word_embeddings and model.config.rms_norm_eps == 1e-5
    ids = tok.encode(PARAGRAPH)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    x = torch.tensor([ids, shuffled])
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits, ref_logits = model(x), ref(x).logits
    assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    nll = nll_per_row(logits, x)
    print(f"SmolLM2 paragraph NLL {nll[0]:.3f} (ppl {nll[0].exp():.1f}), shuffled NLL {nll[1]:.3f}")
    assert nll[0].exp() < 60
    assert nll[1] > nll[0] + 3


def test_smollm2_greedy_chat_is_coherent_and_cache_matches_full_forward(smollm2):
    """Greedy answer with the KV cache; each generated token must also be the argmax of one uncached forward over
    prompt + answer (the uncached greedy decision at every step, atol 0 on tokens)."""
    model, tok = smollm2
    prompt = tok.encode_chat([{"role": "user", "content": "What is spider silk made of?"}])
    T, n = len(prompt), 24
    with torch.no_grad():
        model.setup_cache(1, T + n)
        try:
            logits = model(torch.tensor([prompt]), input_pos=torch.arange(T))
            cached_logits, out = [logits[0, -1]], [int(logits[0, -1].argmax())]
            for pos in range(T, T + n - 1):
                logits = model(torch.tensor([[out[-1]]]), input_pos=torch.tensor([pos]))
                cached_logits.append(logits[0, -1])
                out.append(int(logits[0, -1].argmax()))
        finally:
            model.clear_cache()
        full = model(torch.tensor([prompt + out]))[0, T - 1:-1]
        answer = torch.tensor([out])
        answer_nll = nll_per_row(model(answer), answer)[0]  # the answer read as plain text, without the question
    text = tok.decode(out)
    print(f"greedy answer: {text!r} (plain-text ppl {answer_nll.exp():.1f})")
    assert full.argmax(-1).tolist() == out
    assert_close(torch.stack(cached_logits), full, atol=1e-4, rtol=0)
    assert answer_nll.exp() < 40
    words = text.lower().split()
    assert "silk" in words and sum(w in {"is", "a", "the", "of", "and", "made", "from"} for w in words) >= 3
    assert all(ord(c) < 128 for c in text)


def test_default_name_uses_the_cached_conversion(smollm2_dir):
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert json.loads((smollm2_dir / "config.json").read_text())["vocab_size"] == 49152
    assert load_tokenizer(DEFAULT_MODEL).vocab_size == 49152


def test_save_model_with_reasoning_tokens_loads_in_transformers(smollm2_dir, tmp_path):
    """load -> add reasoning tokens (vocab 49160, mean-embedding rows) -> save_model -> transformers and our loader
    give the same logits/ids/tensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = load_model_and_tokenizer(smollm2_dir)
    emb = model.model.embed_tokens.weight
    assert tok.vocab_size == emb.shape[0] == model.config.vocab_size == 49160
    assert_close(emb[49152:], emb[:49152].mean(0).expand(8, -1))
    out = save_model(model, tok, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and f.get_slice("model.embed_tokens.weight").get_shape() == [49160, 576]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"][0] == tok.eot_id

    text = "<|thinking|>Silk: beta-sheets.<|/thinking|>Spider silk is made of proteins."
    ids = tok.encode_chat([{"role": "user", "content": "What is silk?"}]) + tok.encode(text, allow_special=True)
    assert tok.think_start_id in ids
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok(tok.format_chat([{"role": "user", "content": "What is silk?"}]) + text,
                  add_special_tokens=False).input_ids == ids
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        assert_close(model(x), ref(x).logits, atol=1e-5, rtol=0)

    again, tok2 = load_model_and_tokenizer(out)  # reasoning tokens already present: no further growth
    assert tok2.vocab_size == 49160 and tok2.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_save_model_untied_resized_head_loads_in_transformers(hf_tiny_model, smollm2_dir, tmp_path):
    hf_tiny_model("llama", vocab_size=49152, tie_word_embeddings=False).save_pretrained(tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / "src" / name)
    model, tok = load_model_and_tokenizer(tmp_path / "src", dtype="float32")
    head = model.lm_head.weight
    assert head.shape[0] == 49160 and torch.equal(head[-1], head[:49152].mean(0))
    save_model(model, tok, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    x = torch.tensor([[5, 49152, 77, 49159, 3]])
    with torch.no_grad():
        assert_close(model(x), ref(x).logits, atol=1e-5, rtol=0)


def test_save_model_refuses_unmerged_lora(tiny_llama_dir, tmp_path):
    model, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    model.model.layers[0].self_attn.q_proj.lora_a = torch.nn.Parameter(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="merge"):
        save_model(model, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- GGUF written from random HF models: the q/k un-permutation and the tokenizer metadata ----------------------------
BYTE_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("1", "2"), ("12", "3")]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def gguf_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values()) + [a + b for a, b in BYTE_MERGES] + LLAMA3_SPECIALS


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (half-split RoPE -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, arch: str) -> None:
    """Write a transformers model as llama.cpp would: GGUF tensor names, q/k permuted for `llama`, F32 tensors."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens = gguf_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([f"{a} {b}" for a, b in BYTE_MERGES])
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|eot_id|>"))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for k, t in hf.state_dict().items():
        a = t.float().numpy()
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if k.startswith("model.layers."):
            _, _, i, rest = k.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{names[mod]}.{kind}"
            if arch == "llama" and mod in ("self_attn.q_proj", "self_attn.k_proj"):
                a = llama_cpp_permute(a, c.num_attention_heads if "q_proj" in mod else c.num_key_value_heads)
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[k]
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True)])
def test_gguf_unpermute_matches_transformers(hf_tiny_model, tmp_path, arch, tied):
    V = len(gguf_vocab())
    hf = hf_tiny_model(arch, vocab_size=V, tie_word_embeddings=tied)
    write_gguf(tmp_path / "tiny.gguf", hf, arch)
    model = load_model(tmp_path / "tiny.gguf")
    assert model.config.model_type == arch and model.config.tie_word_embeddings == tied
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_gguf_llama_bpe_tokenizer_matches_transformers(hf_tiny_model, tmp_path):
    """Our tokenizer rebuilt from GGUF metadata (Llama-3 split regex) equals transformers' GGUF tokenizer."""
    from transformers import AutoTokenizer

    write_gguf(tmp_path / "tiny.gguf", hf_tiny_model("llama", vocab_size=len(gguf_vocab())), "llama")
    tok = load_tokenizer(tmp_path / "tiny.gguf")
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert tok.chat_format == "llama3" and tok.eos_id == tok.eot_id == gguf_vocab().index("<|eot_id|>")
    for s in ["the thin 12345 ant\n\n  the", "123456789 x12", "Hi there, in the area!", "  \t\n  tab", "émoji 🧬"]:
        assert tok.encode(s) == ref(s, add_special_tokens=False).input_ids, s
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("123") == [gguf_vocab().index("123")]  # digits grouped by three, then merged
    model, tok = load_model_and_tokenizer(tmp_path / "tiny.gguf")  # two reserved slots reused, six appended
    V = len(gguf_vocab())
    assert tok.vocab_size == model.config.vocab_size == V + 6
    assert tok.think_start_id == gguf_vocab().index("<|reserved_special_token_0|>")
    base = load_model(tmp_path / "tiny.gguf").model.embed_tokens.weight
    emb, mean = model.model.embed_tokens.weight, base.mean(0)
    for name, i in tok.reasoning_ids.items():  # reused reserved slots start at the mean embedding too
        assert_close(emb[i], mean, msg=name)
    others = [i for i in range(V) if i not in tok.reasoning_ids.values()]
    assert torch.equal(emb[others], base[others])


# -- bad input: one-line UserErrors naming the file ------------------------------------------------------------------
def assert_user_error(fn, *needles):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for s in needles:
        assert str(s) in msg, (s, msg)
    return msg


def copy_tiny(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_are_one_line_user_errors(tiny_llama_dir, tmp_path):
    assert_user_error(lambda: load_model(tmp_path / "nope"), tmp_path / "nope", "not found")

    d = copy_tiny(tiny_llama_dir, tmp_path / "no_config")
    (d / "config.json").unlink()
    assert_user_error(lambda: load_model(d), d / "config.json", "missing config.json")

    d = copy_tiny(tiny_llama_dir, tmp_path / "garbage")
    (d / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    assert_user_error(lambda: load_model(d), d / "model.safetensors", "corrupt")

    d = copy_tiny(tiny_llama_dir, tmp_path / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(lambda: load_model(d), d / "model.safetensors", "truncated")

    d = copy_tiny(tiny_llama_dir, tmp_path / "missing_tensor")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    from safetensors.torch import save_file

    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert_user_error(lambda: load_model(d), d, "missing model.layers.1.mlp.up_proj.weight")

    d = copy_tiny(tiny_llama_dir, tmp_path / "bad_key")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert_user_error(lambda: load_model(d), d / "config.json", "hidden_size")
    for bad in ("64", 0, True):  # a string, a zero, a bool: named, not a torch TypeError later
        cfg["hidden_size"] = bad
        (d / "config.json").write_text(json.dumps(cfg))
        assert_user_error(lambda: load_model(d), d / "config.json", "'hidden_size' must be a positive integer")

    d = copy_tiny(tiny_llama_dir, tmp_path / "wrong_shape")
    cfg["hidden_size"], cfg["num_hidden_layers"] = 32, 2
    (d / "config.json").write_text(json.dumps(cfg))
    assert_user_error(lambda: load_model(d), d, "shape")

    (tmp_path / "notes.txt").write_text("not a model")
    assert_user_error(lambda: load_model(tmp_path / "notes.txt"), tmp_path / "notes.txt", "GGUF")

    d = copy_tiny(tiny_llama_dir, tmp_path / "no_tokenizer")
    (d / "tokenizer.json").unlink()
    assert_user_error(lambda: load_tokenizer(d), d / "tokenizer.json")


def test_truncated_gguf_is_a_user_error(tmp_path):
    from preflexor.assets import smollm2_gguf_path

    with open(smollm2_gguf_path(), "rb") as f:
        head = f.read(1 << 20)
    bad = tmp_path / "SmolLM2-head.gguf"
    bad.write_bytes(head)  # the first 1 MB: ends inside the vocabulary metadata
    assert_user_error(lambda: load_model(bad), bad, "GGUF")
    small = tmp_path / "SmolLM2-64k.gguf"
    small.write_bytes(head[: 1 << 16])
    assert_user_error(lambda: load_tokenizer(small), small, "GGUF")


# -- independent check against transformers' own GGUF reader (slow: it dequantises and converts the vocab itself) ----
@pytest.mark.slow
def test_real_gguf_matches_transformers_gguf_loader(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preflexor.assets import smollm2_gguf_path

    path = smollm2_gguf_path()
    model, tok = smollm2
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for s in [PARAGRAPH, "12345 don't  x\n\n\ty 🧬 é", "def f(x):\n    return x**2\n"]:
        assert tok.encode(s) == ref_tok(s, add_special_tokens=False).input_ids
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.tensor([tok.encode(PARAGRAPH)[:32]])
    with torch.no_grad():
        assert_close(model(x), ref(x).logits, atol=1e-5, rtol=0)
