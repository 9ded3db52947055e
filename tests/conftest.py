"""Shared fixtures: the real embedded model as an HF directory, a random tiny Llama with the same tokenizer, and a
factory of random tiny transformers models (the reference for parity tests)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the packaged GGUF to an HF directory (fp32 safetensors, config,
    tokenizer.json/tokenizer_config.json with the chat template). Cached in $PREFLEXOR_CACHE or ~/.cache/preflexor,
    the same place `load_model("smollm2-135m-instruct")` uses: the ~20 s conversion happens once per machine."""
    from preflexor.checkpoint import default_model_dir

    t0 = time.time()
    d = default_model_dir()
    if time.time() - t0 > 1:
        print(f"converted SmolLM2 GGUF -> {d} in {time.time() - t0:.1f}s")
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A random 2-layer Llama (hidden 64, 4 heads / 2 kv heads, tied head) saved by transformers'
    `save_pretrained`, with SmolLM2's tokenizer (vocab 49152, ChatML template). Read-only: copy it before editing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from preflexor.checkpoint import load_tokenizer

    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    load_tokenizer(smollm2_dir).save(d)
    return d


TINY_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def random_hf_model(kind: str = "llama", seed: int = 0, **overrides):
    """A random transformers `LlamaForCausalLM` / `Qwen2ForCausalLM` (eager attention) on `TINY_CONFIG` + overrides.
    Every parameter is randomised (norm gains ~ 1 +- 0.2, the rest ~ N(0, 0.15^2), biases included), so parity tests
    see logits of order 1 and a bug in any tensor shows."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    model = model_cls(cfg_cls(**{**TINY_CONFIG, **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_tiny_model():
    """Factory: `hf_tiny_model(kind="llama"|"qwen2", seed=0, **config_overrides)` -> random transformers model."""
    return random_hf_model
