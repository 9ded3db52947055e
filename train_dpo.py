"""Stage 2 of PRefLexOR ("Independent Reasoning Development", preflexor.md §4): EXO (default), DPO or IPO on
on-policy rejected answers. Starting from the stage-1 model, the current policy samples its own thinking + answer
(with the thinking trigger) as the rejected response every iteration, the teacher pipeline writes the chosen one, and
the thinking is masked (`loss.mask=answer_only`: labels before the last `<|/thinking|>` are ignored) so only the final
answers are compared and the model must find its own reasoning path. The reference is the stage-1 model itself:
the same weights with the stage-2 LoRA adapters disabled (no second copy).

    python train_dpo.py [--config configs/stage2_exo.yaml] [key=value ...]

Reads top to bottom: config, device, model; then `train.run_stage`: data, format check before, training loop,
format check after, save.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from preflexor.checkpoint import load_model_and_tokenizer
from preflexor.config import RunConfig, load_config, to_dict
from preflexor.errors import UserError, exit_on_user_error
from preflexor.losses import get_loss
from preflexor.lora import apply_lora, print_trainable
from preflexor.train import run_stage, seed_everything, setup_runtime
from preflexor.utils import atomic_write_json, git_hash


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    # --- config -----------------------------------------------------------------------------------------------
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/stage2_exo.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.name=sigmoid loss.beta=0.5")
    args = ap.parse_args(argv)
    cfg = load_config(RunConfig, args.config, args.overrides)
    spec = get_loss(cfg.loss.name, key="loss.name")
    if not spec.needs_ref:
        raise UserError(f"loss.name: {cfg.loss.name!r} is a stage-1 loss; stage 2 takes exo_pair, sigmoid or ipo")
    out_dir = Path(cfg.train.out_dir)

    # --- device -----------------------------------------------------------------------------------------------
    rt = setup_runtime(cfg.train.device, cfg.model.dtype)
    seed_everything(cfg.train.seed)
    if rt.main:
        atomic_write_json(out_dir / "config.json", {**to_dict(cfg), "git": git_hash(), "stage": 2})

    # --- model: the stage-1 model + fresh LoRA on the projections (its disabled state is the reference) -------
    if not Path(cfg.model.source).exists() and cfg.model.source.startswith("runs/"):
        raise UserError(f"model.source: {cfg.model.source} not found; run `make train-stage1` first")
    model, tok = load_model_and_tokenizer(cfg.model.source, dtype=rt.dtype, device=rt.device,
                                          add_reasoning_tokens=cfg.model.add_reasoning_tokens)
    apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, rslora=cfg.lora.rslora)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    model.train()
    if rt.main:
        print_trainable(model)

    # --- data, format rate before, training loop, format rate after, save (preflexor/train.py: run_stage) ----
    return run_stage(model, tok, cfg, rt, spec, out_dir, stage=2)


if __name__ == "__main__":
    main()
