"""LoRA adapter files in PEFT's format, both ways: ours load into `peft.PeftModel`, PEFT's load into ours.

Keys: base_model.model.<module>.lora_A.weight / .lora_B.weight (linear), .lora_embedding_A / .lora_embedding_B
(embedding), .base_layer.weight (a LoRA-targeted embedding/head is saved whole, as PEFT does; it carries trained
rows), .token_adapter.trainable_tokens_delta (PEFT "trainable tokens": the new rows' values, not a delta).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from preflexor.errors import UserError
from preflexor.lora import (TARGETS, LoRAEmbedding, LoRALinear, _wrap_embedding, _wrap_head, adapted_modules,
                            apply_lora, freeze_base, lora_scale)
from preflexor.utils import atomic_dir

PEFT_PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _lora_targets(model: nn.Module) -> dict[str, tuple]:
    """{target name: (r, alpha, rslora, dropout)} of the LoRA adapters present in the model."""
    out = {}
    for name, m in adapted_modules(model):
        leaf = name.rpartition(".")[2]
        if m.lora_a is not None:
            p = m.dropout.p if isinstance(m, LoRALinear) and isinstance(m.dropout, nn.Dropout) else 0.0
            out[leaf] = (m.r, m.alpha, m.rslora, p)
        if isinstance(m, LoRAEmbedding) and m.head_lora_a is not None:
            out["lm_head"] = (m.head_r, m.head_alpha, m.head_rslora, 0.0)
    return out


def save_adapter(model: nn.Module, dir: str | Path, base_model_name_or_path: str = "") -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads (atomic).
    New-token rows go into the saved embedding/head when those are LoRA-targeted, else into PEFT's trainable tokens."""
    from safetensors.torch import save_file
    targets = _lora_targets(model)
    if not targets:
        raise UserError("save_adapter: the model has no LoRA adapters (see new_rows_state_dict for rows alone)")
    hypers = {h[:3] for h in targets.values()}
    if len(hypers) != 1:
        raise ValueError(f"save_adapter: PEFT files need one (r, alpha, rslora) for all targets, got {sorted(hypers)}")
    (r, alpha, rslora), = hypers
    tensors, token_indices = {}, {}
    for name, m in adapted_modules(model):
        key = PEFT_PREFIX + name
        if isinstance(m, LoRALinear) and m.lora_a is not None:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = m.lora_a, m.lora_b
        if isinstance(m, LoRAEmbedding) and m.lora_a is not None:
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = m.lora_a, m.lora_b
        if isinstance(m, LoRAEmbedding) and m.head_lora_a is not None:
            tensors[PEFT_PREFIX + "lm_head.lora_A.weight"] = m.head_lora_a
            tensors[PEFT_PREFIX + "lm_head.lora_B.weight"] = m.head_lora_b
            tensors[PEFT_PREFIX + "lm_head.base_layer.weight"] = m.rows_weight()
        if m.lora_a is not None and name in ("model.embed_tokens", "lm_head"):
            tensors[f"{key}.base_layer.weight"] = m.rows_weight()
        elif m.new_rows is not None:
            tensors[f"{key}.token_adapter.trainable_tokens_delta"] = m.new_rows
            token_indices[name.rpartition(".")[2]] = m.row_ids.tolist()
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
        "r": r, "lora_alpha": alpha, "lora_dropout": max(h[3] for h in targets.values()), "use_rslora": rslora,
        "target_modules": sorted(targets), "bias": "none", "modules_to_save": None, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False, "lora_bias": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "trainable_token_indices": token_indices or None, "ensure_weight_tying": False, "revision": None,
    }
    with atomic_dir(dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _read_adapter(dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    cfg_path, weights = dir / CONFIG_FILE, dir / WEIGHTS_FILE
    for p in (cfg_path, weights):
        if not p.is_file():
            raise UserError(f"{p}: not found (a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise UserError(f"{weights}: cannot read ({str(e).splitlines()[0]})") from None
    unsupported = {"peft_type": ("LORA", None), "use_dora": (False, None), "bias": ("none", None),
                   "modules_to_save": (None, []), "fan_in_fan_out": (False, None), "lora_bias": (False, None),
                   "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layers_to_transform": (None, []),
                   "target_parameters": (None, []), "ensure_weight_tying": (False, None)}
    for k, ok in unsupported.items():
        if k in cfg and cfg[k] not in ok:
            raise UserError(f"{cfg_path}: {k}={cfg[k]!r} is not supported (plain LoRA adapters only)")
    for k in ("r", "lora_alpha"):
        if not isinstance(cfg.get(k), (int, float)) or isinstance(cfg.get(k), bool):
            raise UserError(f"{cfg_path}: missing or non-numeric {k!r}")
    return cfg, tensors


def _plan(model: nn.Module, cfg: dict, tensors: dict, where: Path) -> list[tuple[str, str, str, list | None]]:
    """Map each file key to (key, our module name, slot, token ids of a rows slot), checking modules and shapes."""
    r, tied = int(cfg["r"]), model.lm_head is None
    tti = cfg.get("trainable_token_indices") or {}
    if isinstance(tti, list):
        tti = {"embed_tokens": tti}
    plan = []
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise UserError(f"{where}: key {key!r} does not start with {PEFT_PREFIX!r}")
        rest = key[len(PEFT_PREFIX):]
        for suffix, slot in ((".lora_A.weight", "a"), (".lora_B.weight", "b"), (".lora_embedding_A", "a"),
                             (".lora_embedding_B", "b"), (".base_layer.weight", "base"),
                             (".token_adapter.trainable_tokens_delta", "rows")):
            if rest.endswith(suffix):
                name = rest[: -len(suffix)]
                break
        else:
            raise UserError(f"{where}: unexpected key {key!r} (not a LoRA tensor)")
        leaf = name.rpartition(".")[2]
        if name == "lm_head" and tied:
            name, V, H = "model.embed_tokens", *model.model.embed_tokens.weight.shape
            slot = {"a": "head_a", "b": "head_b"}.get(slot, slot)
            shapes = {"head_a": (r, H), "head_b": (V, r), "base": (V, H)}
        else:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise UserError(f"{where}: key {key!r} names module {name!r}, which the model does not have") from None
            out_f, in_f = module.weight.shape
            if leaf == "embed_tokens":
                out_f, in_f = in_f, out_f  # an embedding is a linear V -> H: A [r, V], B [H, r]
            shapes = {"a": (r, in_f), "b": (out_f, r), "base": tuple(module.weight.shape)}
        if slot == "rows":
            if leaf not in tti:
                raise UserError(f"{where}: {key} has no token indices for {leaf!r} in trainable_token_indices")
            shapes["rows"] = (len(tti[leaf]), model.model.embed_tokens.weight.shape[1])
        if slot not in shapes:
            raise UserError(f"{where}: unexpected key {key!r} for module {name!r}")
        if tuple(t.shape) != shapes[slot]:
            raise UserError(f"{where}: {key} has shape {tuple(t.shape)} but the model expects {shapes[slot]} "
                            f"(adapter rank or base model differs)")
        plan.append((key, name, slot, tti.get(leaf)))
    return plan


def _expected_slots(model: nn.Module, targets: list[str]) -> set[tuple[str, str]]:
    """(module name, "a"|"b"|"head_a"|"head_b") of every LoRA tensor a model with LoRA on `targets` holds."""
    out = set()
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in targets and isinstance(module, nn.Linear | LoRALinear) and name != "lm_head":
            out |= {(name, "a"), (name, "b")}
    if "embed_tokens" in targets:
        out |= {("model.embed_tokens", "a"), ("model.embed_tokens", "b")}
    if "lm_head" in targets:
        out |= {("model.embed_tokens", "head_a"), ("model.embed_tokens", "head_b")} if model.lm_head is None else \
            {("lm_head", "a"), ("lm_head", "b")}
    return out


@torch.no_grad()
def load_adapter(model: nn.Module, dir: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or one trained with `peft`) into a `Transformer`. A model without LoRA gets it
    applied from the adapter's config; one with LoRA must match the adapter's targets and rank (its scale is set to
    the adapter's). Every check runs before the model is changed (except untying a tied model whose adapter carries
    a different head matrix, which preserves its function); a mismatch is a one-line UserError naming the file and
    the key or shape."""
    dir = Path(dir)
    cfg, tensors = _read_adapter(dir)
    where = dir / WEIGHTS_FILE
    r, alpha, rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    head_base = tensors.get(PEFT_PREFIX + "lm_head.base_layer.weight")
    if model.lm_head is None and head_base is not None:
        emb_base = tensors.get(PEFT_PREFIX + "model.embed_tokens.base_layer.weight", model.model.embed_tokens.weight)
        if emb_base.shape == head_base.shape and not torch.equal(emb_base.to(head_base), head_base):
            # Saved from an untied copy of this model (train_orpo unties before LoRA on lm_head): untie here too.
            if adapted_modules(model) or not hasattr(model, "untie_head"):
                raise UserError(f"{where}: the adapter's head matrix differs from the embedding but the model is tied")
            model.untie_head()
    plan = _plan(model, cfg, tensors, where)
    file_targets = sorted({("lm_head" if s.startswith("head") else n.rpartition(".")[2])
                           for _, n, s, _ in plan if s in ("a", "b", "head_a", "head_b")})
    unknown = [t for t in file_targets if t not in TARGETS]
    if unknown:
        raise UserError(f"{where}: adapter targets {unknown} are not supported (known: {', '.join(TARGETS)})")
    model_targets = _lora_targets(model)
    if model_targets:
        if sorted(model_targets) != file_targets:
            extra = sorted(set(file_targets) - set(model_targets))
            missing = sorted(set(model_targets) - set(file_targets))
            raise UserError(f"{where}: adapter targets {file_targets} differ from the model's LoRA targets "
                            f"{sorted(model_targets)} (only in adapter: {extra}; only in model: {missing})")
        ranks = sorted({h[0] for h in model_targets.values()})
        if ranks != [r]:
            raise UserError(f"{where}: adapter rank r={r} but the model's LoRA rank is r={ranks[0]}")
    # Every LoRA tensor the model will hold must come from the file (no silently zero or random adapter).
    missing = sorted(_expected_slots(model, file_targets) - {(n, s) for _, n, s, _ in plan})
    if missing:
        n, s = missing[0]
        name = "lm_head" if s.startswith("head") else n
        raise UserError(f"{where}: no {s[-1].upper()} tensor for {PEFT_PREFIX}{name} (adapter covers fewer modules "
                        f"than the model's targets {file_targets})")
    if not model_targets:
        apply_lora(model, r, alpha, float(cfg.get("lora_dropout") or 0.0), file_targets, rslora)
    scale = lora_scale(alpha, r, rslora)
    for key, name, slot, ids in plan:
        t = tensors[key]
        if slot == "rows":
            m = _wrap_embedding(model) if name == "model.embed_tokens" else _wrap_head(model)
            m.set_trainable_rows(torch.as_tensor(ids, dtype=torch.long))
            pos = m.row_index[torch.as_tensor(ids, device=m.row_index.device)]
            m.new_rows[pos] = t.to(m.new_rows)
            continue
        m = model.get_submodule(name)
        if slot == "base":
            m.weight.copy_(t)
            if m.new_rows is not None:  # trained rows travel inside the saved matrix
                m.new_rows.copy_(t[m.row_ids.cpu()])
        elif slot in ("head_a", "head_b"):
            getattr(m, f"head_lora_{slot[-1]}").copy_(t)
            m.head_alpha, m.head_rslora, m.head_scale = alpha, rslora, scale
        else:
            getattr(m, f"lora_{slot}").copy_(t)
            m.alpha, m.rslora, m.scale = alpha, rslora, scale
    freeze_base(model)
    return model
