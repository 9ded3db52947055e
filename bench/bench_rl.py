"""Benchmark one stage-3 GRPO step (G = 8 samples of each of 4 questions, then one update) of ours against TRL's
GRPOTrainer + PEFT, generation and update timed apart.

Setup, the same on both sides: SmolLM2-135M-Instruct real weights (the converted HF directory
`checkpoint.default_model_dir()`, no reasoning tokens added), float32 on CPU, LoRA r=16 alpha=32 dropout 0 on
q,k,v,o,gate,up,down; 4 reasoning-teacher questions per step (`tasks.ReasoningTeacher(graph, seed=2)`, the prompt +
the thinking trigger through the chat template: the same prompt ids on both sides, checked), 8 samples each at
temperature 1.0, top-k 50, top-p 1.0, exactly `--new-tokens` new tokens per sample (ours: no stop ids; TRL:
generation_kwargs min_new_tokens = max_completion_length), the exact-answer reward (`rewards.correctness`), GRPO
(std-scaled group advantages, clip 0.2, beta 0: no reference), AdamW lr 5e-5, gradient clipping at 1.0.
Ours: `train_rl.py`'s step from the library pieces (`sampler.generate_ex(num_samples=8)` from one prefill per
question; the update per question with its prompt packed once, `policy.completion_token_logps`).
TRL: `trl.GRPOTrainer` (per_device_train_batch_size 32 = 4 prompts x num_generations 8, one generation per step,
transformers `generate`), `peft.LoraConfig`.

Timing: ours times generation (generate_ex + decoding) and the update (scoring, advantages, forward, backward, clip,
step) with perf_counter. TRL: a TrainerCallback brackets each step (on_step_begin -> on_step_end: generation,
scoring, the loss forward/backward, clip, optimizer); generation is `GRPOTrainer._generate`, timed by a wrapper;
update = step - generation. The first `--warmup` steps of each process are dropped. samples/s = 32 / step seconds.
Memory: each framework runs in its own process; `peak_rss_mb` is its whole-process peak (ru_maxrss). Runs are
interleaved (ours, TRL, ours, TRL, ...) over `--repeats`; medians over the timed steps of all repeats; one JSON line.

    python bench/bench_rl.py [--repeats 2] [--steps 2] [--warmup 1] [--new-tokens 96] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
Q, G, LR = 4, 8, 5e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _records(n: int) -> list[dict]:
    from preflexor.datagen import DatagenConfig, build_sources
    from preflexor.tasks import ReasoningTeacher

    graph = build_sources(DatagenConfig(corpus="ontology", retrieval="none"))[2]
    teacher = ReasoningTeacher(graph, seed=2)
    return [teacher.example(i) for i in range(n)]


def worker_ours(a) -> dict:
    import torch

    from preflexor import fast, rewards
    from preflexor.checkpoint import default_model_dir, load_model_and_tokenizer
    from preflexor.datagen import model_prompt
    from preflexor.fast import cpu_infer
    from preflexor.losses import get_policy_loss, group_advantages, norm_lengths, policy_hparams
    from preflexor.lora import apply_lora
    from preflexor.optim import build_optimizer
    from preflexor.policy import collate_completions, completion_token_logps
    from preflexor.runtime import setup_runtime
    from preflexor.sampler import generate_ex

    torch.set_num_threads(a.threads)
    rt = setup_runtime("cpu", "float32", verbose=False)
    model, tok = load_model_and_tokenizer(str(default_model_dir()), dtype=rt.dtype, device=rt.device,
                                          add_reasoning_tokens=False)
    apply_lora(model, 16, 32, 0.0, TARGETS)
    fast.install(model, True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, LR, 0.0, rt.device)
    spec, hp = get_policy_loss("grpo"), policy_hparams("grpo", {})
    recs = _records(Q * (a.warmup + a.steps))
    gen_s, upd_s, step_s, lens = [], [], [], set()
    for s in range(a.warmup + a.steps):
        batch_recs = recs[s * Q:(s + 1) * Q]
        prompts = [model_prompt(tok, r["prompt"], stage=2) for r in batch_recs]
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            out = generate_ex(model, prompts, a.new_tokens, 1.0, 50, 1.0, num_samples=G, stop_ids=[],
                              pad_id=tok.pad_id, seed=[1000 * s + G * q for q in range(Q)])
        texts = [[tok.decode(t) for t in group] for group in out.tokens]
        cpu_infer.release(model)
        model.train()
        t1 = time.perf_counter()
        r = [x for rec, group in zip(batch_recs, texts) for x in rewards.correctness(group, rec["meta"]["answer"])]
        adv = group_advantages(torch.tensor(r), G)
        opt.zero_grad(set_to_none=True)
        for q in range(Q):
            b = collate_completions([prompts[q]] * G, out.tokens[q], tok.pad_id)
            mask = b["completion_mask"]
            logps = completion_token_logps(model, b, rt)
            norm = norm_lengths(spec, mask.sum(dim=1), a.new_tokens, a.new_tokens)
            losses, _ = spec.fn(logps, logps.detach(), adv[q * G:(q + 1) * G], mask, None, norm, **hp)
            (losses.sum() / (Q * G)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        t2 = time.perf_counter()
        lens |= {len(t) for group in out.tokens for t in group}
        if s >= a.warmup:
            gen_s.append(t1 - t0)
            upd_s.append(t2 - t1)
            step_s.append(t2 - t0)
    return {"gen_s": gen_s, "update_s": upd_s, "step_s": step_s, "completion_lengths": sorted(lens),
            "prompt_ids": [model_prompt(tok, r["prompt"], stage=2) for r in recs[:Q]]}


def worker_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from preflexor import rewards
    from preflexor.checkpoint import default_model_dir
    from preflexor.thinking import TRIGGER

    torch.set_num_threads(a.threads)
    d = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    recs = _records(Q * (a.warmup + a.steps))
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"] + TRIGGER}],
                             "gold": r["meta"]["answer"]} for r in recs])

    def correct(completions, gold, **_):
        return [rewards.correctness([c[0]["content"] if isinstance(c, list) else c], g)[0]
                for c, g in zip(completions, gold)]

    times: dict[str, list] = {"gen": [], "step": [], "lens": set()}

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            times["step"].append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(output_dir=tmp, per_device_train_batch_size=Q * G, num_generations=G,
                         gradient_accumulation_steps=1, max_completion_length=a.new_tokens,
                         generation_kwargs={"min_new_tokens": a.new_tokens}, temperature=1.0, top_k=50, top_p=1.0,
                         beta=0.0, loss_type="grpo", learning_rate=LR, lr_scheduler_type="constant",
                         max_grad_norm=1.0, max_steps=a.warmup + a.steps, logging_steps=10 ** 6, report_to=[],
                         save_strategy="no", use_cpu=True, dataloader_num_workers=0, shuffle_dataset=False,
                         disable_tqdm=True, seed=0)
        trainer = GRPOTrainer(model=model, reward_funcs=correct, args=cfg, train_dataset=ds, processing_class=tok,
                              peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                     task_type="CAUSAL_LM"), callbacks=[Clock()])
        inner = trainer._generate

        def timed_generate(prompts):
            t0 = time.perf_counter()
            out = inner(prompts)
            times["gen"].append(time.perf_counter() - t0)
            times["lens"] |= {len(c) for c in out[1]}
            return out

        trainer._generate = timed_generate
        trainer.train()
    w = a.warmup
    prompt_ids = [list(tok.apply_chat_template(x["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]) for x in ds.select(range(Q))]
    gen, step = times["gen"][w:], times["step"][w:]
    return {"gen_s": gen, "update_s": [s - g for s, g in zip(step, gen)], "step_s": step,
            "completion_lengths": sorted(times["lens"]), "prompt_ids": prompt_ids}


def _worker(a) -> None:
    res = (worker_ours if a.worker == "ours" else worker_trl)(a)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(res))


def _run(which: str, a) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--worker", which, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--new-tokens", str(a.new_tokens), "--threads", str(a.threads)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"{which} worker failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of each process")
    ap.add_argument("--new-tokens", type=int, default=96, help="new tokens per sample (exactly)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return _worker(a)
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    load = [round(os.getloadavg()[0], 2)]
    for _ in range(a.repeats):
        for which in ("ours", "trl"):
            runs[which].append(_run(which, a))
    load.append(round(os.getloadavg()[0], 2))
    same_prompts = runs["ours"][0]["prompt_ids"] == runs["trl"][0]["prompt_ids"]
    out = {"bench": "rl_step", "questions": Q, "group": G, "new_tokens": a.new_tokens, "threads": a.threads,
           "repeats": a.repeats, "timed_steps": a.steps, "same_prompt_ids": same_prompts}
    for which, rs in runs.items():
        med = {k: statistics.median([x for r in rs for x in r[k]]) for k in ("gen_s", "update_s", "step_s")}
        out[which] = {**{k: round(v, 2) for k, v in med.items()}, "samples_per_s": round(Q * G / med["step_s"], 3),
                      "gen_tokens_per_s": round(Q * G * a.new_tokens / med["gen_s"], 1),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                      "completion_lengths": sorted({n for r in rs for n in r["completion_lengths"]})}
    o, t = out["ours"], out["trl"]
    out.update(ratio_samples_per_s=round(o["samples_per_s"] / t["samples_per_s"], 3),
               ratio_gen=round(t["gen_s"] / o["gen_s"], 3), ratio_update=round(t["update_s"] / o["update_s"], 3),
               ratio_peak_rss=round(o["peak_rss_mb"] / t["peak_rss_mb"], 3), loadavg_1m=load)
    import torch
    import transformers
    import trl
    out.update(torch=torch.__version__, transformers=transformers.__version__, trl_version=trl.__version__)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
