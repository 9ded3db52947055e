"""Stage 1 of PRefLexOR ("Structured Thought Integration", preflexor.md §3): LoRA ORPO on preference pairs whose
chosen answer carries a structured `<|thinking|>…<|/thinking|>` block, in the active loop that regenerates fresh
pairs every iteration with the current model writing the rejected answer (without the thinking trigger).

    python train_orpo.py [--config configs/stage1_orpo.yaml] [key=value ...]
    torchrun --nproc_per_node 2 train_orpo.py train.device=cpu ...

Reads top to bottom: config, device, model; then `train.run_stage`: data, format check before, training loop,
format check after, save.
Output in `train.out_dir`: config.json, metrics.jsonl, curves.png, checkpoints/, data/, summary.json, and final/
(the PEFT-format adapter in final/adapter/ and the merged model in HF format: the input of stage 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from preflexor.checkpoint import load_model_and_tokenizer
from preflexor.config import RunConfig, load_config, to_dict
from preflexor.errors import exit_on_user_error
from preflexor.losses import get_loss
from preflexor.lora import apply_lora, print_trainable, train_new_token_rows
from preflexor.train import run_stage, seed_everything, setup_runtime
from preflexor.utils import atomic_write_json, git_hash


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    # --- config -----------------------------------------------------------------------------------------------
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/stage1_orpo.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4 lora.r=8")
    args = ap.parse_args(argv)
    cfg = load_config(RunConfig, args.config, args.overrides)
    spec = get_loss(cfg.loss.name, key="loss.name")
    out_dir = Path(cfg.train.out_dir)

    # --- device -----------------------------------------------------------------------------------------------
    rt = setup_runtime(cfg.train.device, cfg.model.dtype)
    seed_everything(cfg.train.seed)
    if rt.main:
        atomic_write_json(out_dir / "config.json", {**to_dict(cfg), "git": git_hash(), "stage": 1})

    # --- model: base + reasoning tokens + LoRA (+ the new tokens' rows) ---------------------------------------
    model, tok = load_model_and_tokenizer(cfg.model.source, dtype=rt.dtype, device=rt.device,
                                          add_reasoning_tokens=cfg.model.add_reasoning_tokens)
    if "lm_head" in cfg.lora.targets:
        model.untie_head()  # separate deltas for embedding and head, as the reference did (preflexor.md §3.5)
    apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, rslora=cfg.lora.rslora)
    if cfg.lora.train_new_token_rows and cfg.model.add_reasoning_tokens:
        train_new_token_rows(model, sorted(tok.reasoning_ids.values()))
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    model.train()
    if rt.main:
        print_trainable(model)

    # --- data, format rate before, training loop, format rate after, save (preflexor/train.py: run_stage) ----
    return run_stage(model, tok, cfg, rt, spec, out_dir, stage=1)


if __name__ == "__main__":
    main()
