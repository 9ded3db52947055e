"""Stage 1 of PRefLexOR ("Structured Thought Integration", preflexor.md §3): LoRA ORPO on preference pairs whose
chosen answer carries a structured `<|thinking|>…<|/thinking|>` block, in the active loop that regenerates fresh
pairs every iteration with the current model writing the rejected answer (without the thinking trigger).

    python train_orpo.py [--config configs/stage1_orpo.yaml] [key=value ...]
    torchrun --nproc_per_node 2 train_orpo.py train.device=cpu ...

Output in `train.out_dir`: config.json, metrics.jsonl, curves.png, checkpoints/ (resume state), data/ (the pairs of
every iteration), summary.json, and final/ (the PEFT-format adapter in final/adapter/ and the merged model in HF
format in final/model/: the input of stage 2). `train.resume=auto` continues an interrupted run bit-identically.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from preflexor import fast, fsdp
from preflexor.checkpoint import load_model_and_tokenizer, save_model
from preflexor.config import RunConfig, load_config, to_dict
from preflexor.data import collate_pairs, take_items, tokenize_for
from preflexor.datagen import PairSource
from preflexor.errors import UserError, exit_on_user_error
from preflexor.losses import get_loss
from preflexor.lora import apply_lora, merge_lora, print_trainable, train_new_token_rows
from preflexor.metrics import (MetricsLog, answer_change, format_rate, graded_accuracy, paired_delta, plot_metrics,
                               save_answer_eval)
from preflexor.optim import build_optimizer, lr_factor, set_lr
from preflexor.peft_io import save_adapter
from preflexor.preference import evaluate_pairs, preference_loss
from preflexor.resume import resume_point, rng_states, save_checkpoint, snapshot, start_state, tidy_run_dir
from preflexor.runtime import all_reduce_grads, all_reduce_mean, seed_everything, setup_runtime
from preflexor.tasks import RelationChecker
from preflexor.utils import atomic_write_json, git_hash


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    # --- config -----------------------------------------------------------------------------------------------
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/stage1_orpo.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4 lora.r=8")
    args = ap.parse_args(argv)
    cfg = load_config(RunConfig, args.config, args.overrides)
    tc, lc = cfg.train, cfg.loss
    get_loss(lc.name, key="loss.name")  # an unknown loss fails before anything is loaded
    out_dir = Path(tc.out_dir)

    # --- runtime ----------------------------------------------------------------------------------------------
    rt = setup_runtime(tc.device, cfg.model.dtype, timeout_s=tc.dist_timeout_s)
    seed_everything(tc.seed)
    if rt.main:
        print(f"loss: {lc.name} {lc.hparams()}")

    # --- model: base + reasoning tokens + LoRA (+ the new tokens' rows) + the speed paths ---------------------
    model, tok = load_model_and_tokenizer(cfg.model.source, dtype=rt.dtype, device=rt.device,
                                          add_reasoning_tokens=cfg.model.add_reasoning_tokens)
    if "lm_head" in cfg.lora.targets:
        model.untie_head()  # separate deltas for embedding and head, as the reference did (preflexor.md §3.5)
    apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, rslora=cfg.lora.rslora)
    if cfg.lora.train_new_token_rows and cfg.model.add_reasoning_tokens:
        train_new_token_rows(model, sorted(tok.reasoning_ids.values()))
    fast.install(model, cfg.model.fast)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    model.train()
    if rt.main:
        print_trainable(model)
    if tc.fsdp:  # FSDP2: each rank keeps 1/world of every weight between uses (preflexor/fsdp.py)
        if rt.world < 2:
            raise UserError("train.fsdp=true shards over torchrun's processes: use torchrun --nproc_per_node 2+")
        fsdp.shard(model, rt)
        if rt.main:
            print(f"FSDP2: layers and root sharded over {rt.world} ranks")

    # --- optimizer and the resume point, checked (model, settings) before anything is written into out_dir ----
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, rt.device, cfg.lora.new_rows_lr)
    total = tc.iterations * tc.steps_per_iteration
    ckpt = resume_point(out_dir / "checkpoints", tc.resume, model, optimizer, to_dict(cfg), tc.allow_resume_changes,
                        rt.main)

    # --- data: a preference JSONL (read and checked here), or the active loop's generator ---------------------
    source = PairSource(cfg, tok, model, rt, out_dir, stage=1)

    # --- the run directory: written from here on, the command being valid (model, resume point, pair file) ----
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=rt.main)
    if rt.main:
        tidy_run_dir(out_dir, ckpt, metrics)  # stale temporaries; the log cut back to the resume point
        atomic_write_json(out_dir / "config.json", {**to_dict(cfg), "git": git_hash(), "stage": 1})

    # --- held-out pairs; the format rate before ---------------------------------------------------------------
    with fsdp.gathered(model):  # generation (held-out rejected answers) on whole weights
        heldout = source.heldout()
    held_ex, _ = tokenize_for(tok, heldout, cfg.data, lc, seed=0)
    questions = [r["prompt"] for r in heldout[:tc.eval_generations]]

    def format_check() -> dict | None:  # greedy answers to the held-out questions, each rank answering its share
        if not questions:
            return None
        with fsdp.gathered(model):
            return format_rate(model, tok, questions, tc.eval_max_new_tokens, cfg.data.system_prompt, rt=rt)

    graded = source.answer_set(tc.eval_answers)  # the fixed evaluation set: held-out concepts, gold answers

    checker = RelationChecker(source.graph()) if graded else None  # thinking factuality against the graph

    def answer_check(reuse_from: str | None = None) -> dict | None:  # exact-answer accuracy of greedy answers
        with fsdp.gathered(model):
            return graded_accuracy(model, tok, graded, tc.eval_answer_tokens, cfg.data.system_prompt, rt, checker,
                                   reuse_from)

    before, answers_before = format_check(), answer_check(reuse_from=cfg.model.source)

    # --- resume: the checkpoint's weights and RNG states, here, after the "before" evaluation -----------------
    state = start_state(ckpt, model, rt)

    def run_eval(step: int) -> dict:
        if not held_ex:
            return {}
        with fsdp.gathered(model):
            ev = evaluate_pairs(model, held_ex, tok.pad_id, lc, rt)
        ev = {f"eval/{k}": v for k, v in ev.items() if k not in ("margins", "n_pairs")}
        metrics.log({"step": step, **ev})
        return ev

    # --- the loop: each iteration's pairs (generated with the current model), then its optimizer steps --------
    last_eval = run_eval(0) if state["global_step"] == 0 else state.pop("last_eval", {})  # not logged twice
    bar = tqdm(total=total, initial=state["global_step"], desc="train", disable=not rt.main, dynamic_ncols=True)
    while state["iteration"] < tc.iterations:
        it = state["iteration"]
        with fsdp.gathered(model):  # the iteration's pairs, rejected answers sampled from the current model
            pairs = source.for_iteration(it)
        examples, dropped = tokenize_for(tok, pairs, cfg.data, lc, seed=tc.seed + it)
        if not examples:
            raise UserError(f"iteration {it}: no usable pairs ({dropped} dropped by truncation; raise data.max_length)")
        while state["step_in_iteration"] < tc.steps_per_iteration:
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            t_step, n_tokens = time.perf_counter(), 0  # throughput of the optimizer step alone (not eval/datagen)
            for _ in range(tc.grad_accum):  # forward, loss, backward per micro-batch; this rank's share of the batch
                idx = take_items(len(examples), tc.seed + it, state["position"], tc.batch_size * rt.world)
                idx = idx[rt.rank * tc.batch_size:(rt.rank + 1) * tc.batch_size]
                state["position"] += tc.batch_size * rt.world
                batch = collate_pairs([examples[i] for i in idx], tok.pad_id, nll_prompt=lc.nll_prompt)
                losses, m = preference_loss(model, batch, lc, rt)  # ORPO: NLL + beta * odds-ratio term
                (losses.mean() / tc.grad_accum).backward()
                for k, v in {"loss": losses, **m}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach().float().mean()) / tc.grad_accum
                n_tokens += int(batch["attention_mask"].sum())
            if not fsdp.sharded(model):  # FSDP has reduce-scattered (averaged) them already
                all_reduce_grads(trainable, rt.world)
            grad_norm = fsdp.clip_grad_norm(trainable, tc.max_grad_norm) if tc.max_grad_norm > 0 else 0.0
            lr = set_lr(optimizer, tc.lr, lr_factor(state["global_step"], tc.schedule, tc.warmup_steps, total))
            optimizer.step()
            state["global_step"] += 1
            state["step_in_iteration"] += 1
            step = state["global_step"]
            rec = {k: all_reduce_mean(v, rt) for k, v in sums.items()}
            rec.update(step=step, iteration=it, lr=lr, grad_norm=grad_norm,
                       tokens_per_s=n_tokens * rt.world / (time.perf_counter() - t_step))
            if step % max(tc.log_every, 1) == 0:
                metrics.log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", margin=f"{rec.get('rewards/margins', 0.0):.3f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}")
            end_of_iteration = state["step_in_iteration"] >= tc.steps_per_iteration
            if (tc.eval_every and step % tc.eval_every == 0) or (end_of_iteration and not tc.eval_every):
                last_eval = run_eval(step)
            if end_of_iteration:
                state.update(iteration=it + 1, step_in_iteration=0, position=0)
            if (tc.save_every and step % tc.save_every == 0) or end_of_iteration:
                rng = rng_states(rt)  # every rank's, so that each resumes its own
                snap = snapshot(model, optimizer)  # whole tensors (a collective under FSDP)
                if rt.main:
                    save_checkpoint(out_dir / "checkpoints", step, snap, {**state, "last_eval": last_eval},
                                    tc.keep_last, rng, config=to_dict(cfg))
            if rt.world > 1:
                dist.barrier()
            if end_of_iteration:
                break
    bar.close()
    if not last_eval:
        last_eval = run_eval(state["global_step"])

    # --- after training: the format rate again, summary, adapter and merged model (main rank) -----------------
    after, answers_after = format_check(), answer_check()
    summary = {"eval": last_eval, "format_before": before, "format_after": after, "answers_before": answers_before,
               "answers_after": answers_after,
               "answers_delta": paired_delta(answers_before, answers_after) if answers_before else None}
    if not rt.main:
        with fsdp.gathered(model):  # rank 0 saves the whole weights (a collective under FSDP)
            return summary
    plot_metrics(metrics.read(), out_dir / "curves.png")
    if before and after:
        print(f"thinking-format rate: before {before['format_rate']:.2f} -> after {after['format_rate']:.2f} "
              f"(opens with <|thinking|>: {before['opens_thinking_rate']:.2f} -> {after['opens_thinking_rate']:.2f})")
    if answers_before and answers_after:
        print(answer_change(answers_before, answers_after, summary['answers_delta']))
    print("held-out: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in last_eval.items()))
    with fsdp.gathered(model):
        save_adapter(model, out_dir / "final" / "adapter", base_model_name_or_path=cfg.model.source)
        if tc.save_merged:
            merge_lora(model)
            save_model(model, tok, out_dir / "final" / "model")
            if answers_after:
                save_answer_eval(out_dir / "final" / "model", answers_after["key"], answers_after)
    atomic_write_json(out_dir / "summary.json", summary)
    print(f"saved {out_dir / 'final'}")
    return summary


if __name__ == "__main__":
    main()
