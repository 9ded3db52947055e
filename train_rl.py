"""Stage 3 (beyond the paper): online RL with verifiable rewards from the knowledge graph. GRPO (default), Dr. GRPO
or DAPO (`loss.name`, preflexor/losses.py) on the reasoning teacher's questions (preflexor/tasks.py), whose answers
are computed from the graph, so the reward is exact and no judge is needed. Every step the current policy samples
`rl.group_size` thinking + answer responses to each question from one prefill, the rewards (preflexor/rewards.py)
score them, group-relative advantages weigh their log-probs, and one optimizer step follows. The reference (for a
KL term, `loss.beta` > 0) is the starting model with the stage-3 LoRA adapters disabled (no second copy).

    python train_rl.py [--config configs/stage3_grpo.yaml] [key=value ...]

Output in `train.out_dir` as for train_orpo.py; final/model/ is the stage-3 model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from preflexor import fast, fsdp, rewards
from preflexor.checkpoint import load_model_and_tokenizer, save_model
from preflexor.config import RunConfig, load_config, to_dict
from preflexor.datagen import DatagenConfig, build_sources, model_prompt, reasoning_teacher
from preflexor.errors import UserError, exit_on_user_error
from preflexor.fast import cpu_infer
from preflexor.losses import get_policy_loss, group_advantages, norm_lengths, policy_hparams
from preflexor.lora import apply_lora, merge_lora, print_trainable
from preflexor.metrics import (Judge, MetricsLog, answer_change, graded_accuracy, paired_delta, plot_metrics,
                               save_answer_eval)
from preflexor.optim import build_optimizer, lr_factor, set_lr
from preflexor.peft_io import save_adapter
from preflexor.policy import collate_completions, completion_token_logps, reference_token_logps
from preflexor.resume import resume_point, rng_states, save_checkpoint, snapshot, start_state, tidy_run_dir
from preflexor.runtime import all_reduce_grads, all_reduce_mean, seed_everything, setup_runtime
from preflexor.sampler import FINISH_LENGTH, generate_ex
from preflexor.tasks import HELDOUT_START, RelationChecker, answer_set
from preflexor.thinking import AnswerWatch
from preflexor.utils import atomic_write_json, git_hash


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    # --- config -----------------------------------------------------------------------------------------------
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/stage3_grpo.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.name=dapo rl.group_size=4")
    args = ap.parse_args(argv)
    cfg = load_config(RunConfig, args.config, args.overrides)
    tc, lc, sc, rc, dc = cfg.train, cfg.loss, cfg.sample, cfg.rl, cfg.data
    spec = get_policy_loss(lc.name)
    hp = policy_hparams(lc.name, lc.params)
    if dc.teacher != "reasoning":
        raise UserError(f"data.teacher: stage 3 needs checkable answers: 'reasoning', got {dc.teacher!r}")
    if sc.temperature <= 0:
        raise UserError("sample.temperature: a group of greedy samples is one sample G times; use > 0")
    if rc.reward_overlong and rc.overlong_buffer >= sc.max_new_tokens:
        raise UserError(f"rl.overlong_buffer: must be below sample.max_new_tokens ({sc.max_new_tokens}), "
                        f"got {rc.overlong_buffer}")
    if rc.reward_judge and not rc.judge_url:
        raise UserError("rl.judge_url: rl.reward_judge is set, so the judge's endpoint is needed")
    weights = rc.weights()
    if not any(weights.values()):
        raise UserError("rl.reward_*: every reward weight is 0; nothing to learn from")
    out_dir = Path(tc.out_dir)
    G, Q = rc.group_size, rc.questions_per_step

    # --- runtime ----------------------------------------------------------------------------------------------
    rt = setup_runtime(tc.device, cfg.model.dtype, timeout_s=tc.dist_timeout_s)
    seed_everything(tc.seed)
    if rt.main:
        print(f"loss: {lc.name} {hp}; rewards: {', '.join(f'{k} {w}' for k, w in weights.items() if w)}; "
              f"{Q} questions x {G} samples per rank and step")

    # --- model: the stage-2 (or stage-1) model + fresh LoRA (with LoRA disabled, it is the reference) ---------
    if not Path(cfg.model.source).exists() and cfg.model.source.startswith("runs/"):
        raise UserError(f"model.source: {cfg.model.source} not found; train stages 1-2 first (README: stage 3)")
    model, tok = load_model_and_tokenizer(cfg.model.source, dtype=rt.dtype, device=rt.device,
                                          add_reasoning_tokens=cfg.model.add_reasoning_tokens)
    apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, rslora=cfg.lora.rslora)
    fast.install(model, cfg.model.fast)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    model.train()
    if rt.main:
        print_trainable(model)
    if tc.fsdp:
        if rt.world < 2:
            raise UserError("train.fsdp=true shards over torchrun's processes: use torchrun --nproc_per_node 2+")
        fsdp.shard(model, rt)

    # --- optimizer and the resume point, checked before anything is written into out_dir ---------------------
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, rt.device, cfg.lora.new_rows_lr)
    total = tc.iterations * tc.steps_per_iteration
    ckpt = resume_point(out_dir / "checkpoints", tc.resume, model, optimizer, to_dict(cfg), tc.allow_resume_changes,
                        rt.main)

    # --- data: the reasoning teacher's training questions (gold answers from the graph), the fixed held-out set
    graph = build_sources(DatagenConfig(corpus=dc.corpus, retrieval="none"))[2]
    teacher = reasoning_teacher(dc, graph)
    checker = RelationChecker(graph)
    judge = Judge(rc.judge_url, rc.judge_model) if rc.reward_judge else None
    graded = answer_set(graph, tc.eval_answers, dc.kg_triples > 0) if tc.eval_answers else []

    def questions_at(position: int) -> list[dict]:  # this rank's share of the step's questions
        start = position + rt.rank * Q
        return [teacher.example((start + k) % HELDOUT_START) for k in range(Q)]

    # --- the run directory: written from here on, the command being valid ------------------------------------
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=rt.main)
    if rt.main:
        tidy_run_dir(out_dir, ckpt, metrics)
        atomic_write_json(out_dir / "config.json", {**to_dict(cfg), "git": git_hash(), "stage": 3})

    def answer_check(reuse_from: str | None = None) -> dict | None:  # exact accuracy of greedy answers, held out
        with fsdp.gathered(model):
            return graded_accuracy(model, tok, graded, tc.eval_answer_tokens, dc.system_prompt, rt, checker,
                                   reuse_from)

    answers_before = answer_check(reuse_from=cfg.model.source)
    state = start_state(ckpt, model, rt)
    last_eval = state.pop("last_eval", {})

    # --- the loop: sample G responses per question, score, advantages, one update ----------------------------
    bar = tqdm(total=total, initial=state["global_step"], desc="train", disable=not rt.main, dynamic_ncols=True)
    while state["global_step"] < total:
        step, it = state["global_step"], state["iteration"]
        t0 = time.perf_counter()
        # sample: one prefill per question, G samples from it; a sample ends at its answer's first line
        records = questions_at(state["position"])
        prompts = [model_prompt(tok, r["prompt"], stage=2, system=dc.system_prompt) for r in records]
        watch = AnswerWatch(tok, Q * G) if rc.stop_when_answered else None
        model.eval()
        with torch.no_grad(), fsdp.gathered(model):
            out = generate_ex(model, prompts, sc.max_new_tokens, sc.temperature, sc.top_k, sc.top_p, num_samples=G,
                              stop_ids=tok.stop_ids, pad_id=tok.pad_id, on_token=watch,
                              seed=[tc.seed * 1_000_003 + (state["position"] + rt.rank * Q + k) * G
                                    for k in range(Q)])
        cpu_infer.release(model)  # the update changes the weights: the packed CPU copy would go stale
        model.train()
        t_gen = time.perf_counter() - t0

        # score: the rewards of each group, group-relative advantages, groups whose rewards all agree
        comps, cut, total_r, parts = [], [], [], {}
        for q, rec in enumerate(records):
            toks = out.tokens[q]
            truncated = [why == FINISH_LENGTH for why in out.finish_reasons[q]]
            txt = [tok.decode(t) for t in toks]
            r, p = rewards.score(txt, rec, weights, lengths=[len(t) for t in toks], truncated=truncated,
                                 budget=sc.max_new_tokens, overlong_buffer=rc.overlong_buffer, checker=checker,
                                 judge=judge)
            for k, v in {"correct": rewards.correctness(txt, rec["meta"]["answer"]),
                         "format": rewards.thinking_format(txt), **p}.items():
                parts.setdefault(k, []).extend(v)
            total_r += r
            cut += truncated
            # the update sees what the sampler chose: the end-of-turn token where a stop id ended a sample (the stop
            # id itself is not returned); nothing more where the answer watch or the budget ended it
            ended = [why != FINISH_LENGTH and not (watch and watch.stopped[q * G + j])
                     for j, why in enumerate(out.finish_reasons[q])]
            comps += [t + [tok.eot_id] * e for t, e in zip(toks, ended)]
        rewards_t = torch.tensor(total_r)
        adv = group_advantages(rewards_t, G, scale=spec.scale_std)
        equal = (rewards_t.view(Q, G).max(dim=1).values == rewards_t.view(Q, G).min(dim=1).values)  # (Q,)
        keep = [i for i in range(Q * G) if not (rc.drop_equal_groups and equal[i // G])]

        # update: the step's loss is the mean over every kept sample of every rank (micro-batches of batch_size)
        n_local = len(keep)
        n_global = round(all_reduce_mean(float(n_local), rt) * rt.world)
        len_global = all_reduce_mean(float(sum(len(comps[i]) for i in keep)), rt) * rt.world
        mean_len = len_global / max(n_global, 1)
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        t1, n_tokens = time.perf_counter(), 0
        # a rank whose groups were all dropped still runs one forward at weight 0 (FSDP's collectives need every rank)
        rows, w = (keep, rt.world / max(n_global, 1)) if keep or not fsdp.sharded(model) else ([0], 0.0)
        micro = []  # per question (its prompt then runs once, fast.shared_prompt), at most batch_size samples each
        for q in range(Q):
            mine = sorted((i for i in rows if i // G == q), key=lambda i: len(comps[i]))
            micro += [mine[s:s + tc.batch_size] for s in range(0, len(mine), tc.batch_size)]
        for idx in micro:
            batch = collate_completions([prompts[i // G] for i in idx], [comps[i] for i in idx], tok.pad_id)
            mask = batch["completion_mask"].to(rt.device)
            logps = completion_token_logps(model, batch, rt)
            ref = reference_token_logps(model, batch, rt) if hp["beta"] != 0.0 else None
            norm = norm_lengths(spec, mask.sum(dim=1), mean_len, sc.max_new_tokens)
            losses, m = spec.fn(logps, logps.detach(), adv[idx].to(rt.device), mask, ref, norm, **hp)
            (losses.sum() * w).backward()
            for k, v in {"loss": losses.detach(), **m}.items():
                sums[k] = sums.get(k, 0.0) + float(v.float().sum()) * (w > 0)
            n_tokens += int(batch["attention_mask"].sum())
        if not fsdp.sharded(model):
            all_reduce_grads(trainable, rt.world)
        grad_norm = fsdp.clip_grad_norm(trainable, tc.max_grad_norm) if tc.max_grad_norm > 0 and n_global else 0.0
        lr = set_lr(optimizer, tc.lr, lr_factor(step, tc.schedule, tc.warmup_steps, total))
        if n_global:  # every group dropped on every rank: nothing to learn from this step
            optimizer.step()
        state["global_step"] += 1
        state["step_in_iteration"] += 1
        state["position"] += Q * rt.world

        # log: every reward, accuracy, KL, clipping, lengths, throughput (rank means)
        rec = {k: all_reduce_mean(v / max(n_local, 1), rt) for k, v in sums.items()}
        rec.update({f"reward/{k}": all_reduce_mean(sum(v) / len(v), rt) for k, v in parts.items()})
        rec.update(step=step + 1, iteration=it, lr=lr, grad_norm=grad_norm,
                   reward=all_reduce_mean(sum(total_r) / len(total_r), rt),
                   accuracy=all_reduce_mean(sum(parts["correct"]) / len(parts["correct"]), rt),
                   truncated=all_reduce_mean(sum(cut) / len(cut), rt),
                   equal_groups=all_reduce_mean(float(equal.float().mean()), rt), samples=n_global,
                   sample_tokens_per_s=all_reduce_mean(out.completion_tokens / t_gen, rt) * rt.world,
                   train_tokens_per_s=all_reduce_mean(n_tokens / max(time.perf_counter() - t1, 1e-9), rt) * rt.world)
        if (step + 1) % max(tc.log_every, 1) == 0:
            metrics.log(rec)
        bar.update(1)
        bar.set_postfix(reward=f"{rec['reward']:.2f}", acc=f"{rec['accuracy']:.2f}",
                        kl=f"{rec.get('kl', 0.0):.3f}", tok_s=f"{rec['sample_tokens_per_s']:.0f}")

        end_of_iteration = state["step_in_iteration"] >= tc.steps_per_iteration
        if tc.eval_every and state["global_step"] % tc.eval_every == 0 and graded:
            ev = answer_check()
            last_eval = {"eval/exact_accuracy": ev["exact_accuracy"], "eval/format_rate": ev["format_rate"]}
            metrics.log({"step": state["global_step"], **last_eval})
        if end_of_iteration:
            state.update(iteration=it + 1, step_in_iteration=0)
        if (tc.save_every and state["global_step"] % tc.save_every == 0) or end_of_iteration:
            rng = rng_states(rt)
            snap = snapshot(model, optimizer)
            if rt.main:
                save_checkpoint(out_dir / "checkpoints", state["global_step"], snap, {**state, "last_eval": last_eval},
                                tc.keep_last, rng, config=to_dict(cfg))
        if rt.world > 1:
            dist.barrier()
    bar.close()

    # --- after training: the held-out accuracy again, summary, adapter and merged model (main rank) -----------
    answers_after = answer_check()
    summary = {"eval": last_eval, "answers_before": answers_before, "answers_after": answers_after,
               "answers_delta": paired_delta(answers_before, answers_after) if answers_before else None}
    if not rt.main:
        with fsdp.gathered(model):
            return summary
    plot_metrics(metrics.read(), out_dir / "curves.png", keys=("loss", "reward", "accuracy", "kl", "grad_norm"))
    if answers_before and answers_after:
        print(answer_change(answers_before, answers_after, summary['answers_delta']))
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
