"""Benchmark one preference training step (forward + backward + clip + AdamW) of ours against TRL + PEFT.

Setup (reference/peers.md, the same on both sides): SmolLM2-135M-Instruct real weights (the converted HF directory
`checkpoint.default_model_dir()`), float32 on CPU, LoRA r=16 alpha=32 dropout 0 on q,k,v,o,gate,up,down, batch 2
pairs, prompt 64 + chosen 192 + rejected 192 tokens (sequences of 256), beta 0.1, AdamW lr 2e-4 (no weight decay,
constant schedule), gradient clipping at 1.0, gradient checkpointing off (gc0) or on (gc1).
Data: random token ids from a fixed seed, fed as token ids to both sides, so both train on exactly the same tokens
(TRL's text tokenization is bypassed: `ORPOTrainer.tokenize_row` and `DPOTrainer._prepare_dataset` are overridden to
emit the features TRL's own tokenizer step would emit, without the BOS/EOS it would insert).

Losses:
  orpo  ours: `train.preference_loss` with "orpo" (one forward over [chosen; rejected], chunked `token_logps`)
        TRL:  trl.experimental.orpo.ORPOTrainer + peft LoraConfig
  exo   ours: "exo_pair", epsilon 1e-3, reference log-probs from the same network with LoRA disabled, every step
        TRL:  trl.DPOTrainer(loss_type="exo_pair", label_smoothing=1e-3), ref_model=None + peft (adapter-disabled
              reference every step, precompute_ref_log_probs=False)

Timing: ours times each step with `time.perf_counter` around exactly what `train.fit` does per optimizer step
(zero_grad, preference_loss, backward, metric floats, clip, lr, step); the batch is collated outside the window.
TRL is timed by a TrainerCallback from `on_step_begin` to `on_step_end`, which brackets the same work (training_step =
forward + backward, clipping, optimizer and scheduler step, zero_grad) and leaves out batch fetching/collation and
logging; logging, saving and evaluation are off, `report_to=[]`, dataloader workers 0, fp32, no compile. The first
`--warmup` steps of every process are dropped. tokens/s counts prompt + chosen + rejected once (896 per step);
`fwd_tokens_per_s` counts the 2 x 2 x 256 tokens actually run through the model.

Memory: every (framework, loss, gc) run is its own process, so `peak_rss_mb` (ru_maxrss) is that configuration's
whole-process peak (ours never imports transformers/trl/peft). `train_growth_mb` = the kernel's RSS high-water mark
during the training steps (VmHWM, reset through /proc/self/clear_refs when training starts) minus the RSS then.

Runs are interleaved (repeat 1: ours, trl; repeat 2: ours, trl; ...) so both see similar machine load; the load
average at the start and end of each configuration is recorded. With `--lockstep` both workers of a repeat stay
alive and take single steps in turn (the other waits, idle), which pairs every step with one of the peer's under the
same machine conditions (`ratio_tokens_per_s_paired_steps`). One JSON line per (loss, gc) configuration on stdout:
per framework medians with min-max over repeats, and ours/TRL ratios.

    python bench/bench_train.py                                  # orpo,exo x gc 0,1 x 3 repeats (about 1 h quiet)
    python bench/bench_train.py --losses orpo --gc 0 --repeats 1 # quick
    python bench/bench_train.py --losses orpo,exo --gc 0 --repeats 2 --steps 6 --warmup 1 --lockstep  # README
    python bench/bench_train.py --profile --losses orpo --gc 0   # torch.profiler table of our step (top ops)
"""
from __future__ import annotations

import argparse
import gc
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
sys.path.insert(0, str(ROOT))

PAIRS, PROMPT, CHOSEN, REJECTED = 2, 64, 192, 192
TOKENS_PER_STEP = PAIRS * (PROMPT + CHOSEN + REJECTED)  # 896: prompt + chosen + rejected counted once
FWD_TOKENS_PER_STEP = 2 * PAIRS * (PROMPT + CHOSEN)  # 1024: rows actually run through the model
LORA_R, LORA_ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BETA, EXO_EPS, LR, MAX_GRAD_NORM = 0.1, 1e-3, 2e-4, 1.0
LOSS_NAMES = {"orpo": "orpo", "exo": "exo_pair"}
SEED = 0


# -- memory and load ---------------------------------------------------------------------------------------------


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class TrainMemory:
    """Peak RSS of the whole process and the RSS growth during the training steps (see the module docstring)."""

    def start(self) -> None:
        gc.collect()
        self.peak_before = _maxrss_mb()  # clear_refs also lowers ru_maxrss, so keep the peak so far
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.rss_start = _status_mb("VmRSS")

    def stop(self) -> dict:
        train_peak = _status_mb("VmHWM") if self.hwm_reset else _maxrss_mb()
        return {"peak_rss_mb": round(max(self.peak_before, _maxrss_mb(), train_peak), 1),
                "rss_train_start_mb": round(self.rss_start, 1), "rss_train_peak_mb": round(train_peak, 1),
                "train_growth_mb": round(train_peak - self.rss_start, 1), "hwm_reset": self.hwm_reset}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- data --------------------------------------------------------------------------------------------------------


def make_examples(n: int, seed: int = SEED) -> list[dict]:
    """n pairs of random token ids with exact lengths PROMPT/CHOSEN/REJECTED (ids 3.. avoid the special tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, c, r = (torch.randint(3, 49152, (k,), generator=g).tolist() for k in (PROMPT, CHOSEN, REJECTED))
        out.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    return out


def _summary(step_s: list[float], cpu_s: list[float]) -> dict:
    total = sum(step_s)
    return {"tokens_per_s": round(TOKENS_PER_STEP * len(step_s) / total, 2),
            "tokens_per_s_median_step": round(TOKENS_PER_STEP / statistics.median(step_s), 2),
            "fwd_tokens_per_s": round(FWD_TOKENS_PER_STEP * len(step_s) / total, 2),
            "s_per_step_mean": round(total / len(step_s), 3), "s_per_step_median": round(statistics.median(step_s), 3),
            "cpu_s_per_step_median": round(statistics.median(cpu_s), 3),
            "step_s": [round(t, 3) for t in step_s]}


# -- ours --------------------------------------------------------------------------------------------------------


def _ours_setup(loss: str, gc_on: bool, new_token_rows: bool = False):
    import torch

    from preflexor import fast
    from preflexor.checkpoint import DEFAULT_MODEL, load_model_and_tokenizer
    from preflexor.config import LossConfig
    from preflexor.lora import apply_lora, train_new_token_rows
    from preflexor.optim import build_optimizer
    from preflexor.runtime import setup_runtime

    torch.manual_seed(SEED)
    rt = setup_runtime("cpu", "float32", verbose=False)
    model, tok = load_model_and_tokenizer(DEFAULT_MODEL, dtype="float32", add_reasoning_tokens=new_token_rows)
    apply_lora(model, LORA_R, LORA_ALPHA, 0.0, TARGETS)
    if new_token_rows:  # the stage-1 config also trains the reasoning tokens' rows of the (tied) embedding/head
        train_new_token_rows(model, sorted(tok.reasoning_ids.values()))
    fast.install(model)  # as the training scripts do (model.fast: true)
    model.gradient_checkpointing = gc_on
    model.train()
    optimizer = build_optimizer(model, LR, 0.0, rt.device)
    return model, tok, rt, LossConfig(name=LOSS_NAMES[loss], params={"beta": BETA, "epsilon": EXO_EPS}), optimizer


def _ours_step(model, batch, loss_cfg, name, rt, optimizer, trainable) -> float:
    """One optimizer step exactly as the training scripts' loop runs it (grad_accum 1, constant lr)."""
    import torch

    from preflexor.optim import set_lr
    from preflexor.preference import preference_loss

    optimizer.zero_grad(set_to_none=True)
    losses, m = preference_loss(model, batch, loss_cfg, rt, ref=None)
    losses.mean().backward()
    sums = {k: float(v.detach().float().mean()) for k, v in {"loss": losses, **m}.items()}
    int(batch["attention_mask"].sum())  # the loop's throughput counter
    float(torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM))
    set_lr(optimizer, LR, 1.0)
    optimizer.step()
    return sums["loss"]


def _lockstep_wait(args, i: int) -> None:
    """--lockstep: announce step i, then block until the driver says go (the other framework's process is idle
    meanwhile, so the two alternate step by step under the same machine conditions)."""
    if args.lockstep:
        print(json.dumps({"wait": i}), flush=True)
        sys.stdin.readline()


def _lockstep_done(args, i: int, wall: float) -> None:
    if args.lockstep:
        print(json.dumps({"done": i, "wall": wall}), flush=True)


def worker_ours(args) -> dict:
    t0 = time.perf_counter()
    load_start = _load()
    model, tok, rt, spec, optimizer = _ours_setup(args.loss, args.gc == 1, args.new_token_rows)
    from preflexor.data import collate_pairs

    trainable = [p for p in model.parameters() if p.requires_grad]
    examples = make_examples(PAIRS * (args.warmup + args.steps))
    setup_s = time.perf_counter() - t0
    mem = TrainMemory()
    mem.start()
    step_s, cpu_s, losses = [], [], []
    for i in range(args.warmup + args.steps):
        batch = collate_pairs(examples[i * PAIRS:(i + 1) * PAIRS], tok.pad_id)
        _lockstep_wait(args, i)
        w0, c0 = time.perf_counter(), time.process_time()
        losses.append(_ours_step(model, batch, spec, LOSS_NAMES[args.loss], rt, optimizer, trainable))
        w1, c1 = time.perf_counter(), time.process_time()
        _lockstep_done(args, i, w1 - w0)
        if i >= args.warmup:
            step_s.append(w1 - w0)
            cpu_s.append(c1 - c0)
    import torch

    return {**_summary(step_s, cpu_s), **mem.stop(), "setup_s": round(setup_s, 2), "first_loss": round(losses[0], 5),
            "last_loss": round(losses[-1], 5), "load_start": load_start, "load_end": _load(),
            "threads": torch.get_num_threads(), "trainable_params": sum(p.numel() for p in trainable),
            "leaked_modules": sorted({m.split(".")[0] for m in sys.modules} & {"transformers", "trl", "peft"})}


# -- TRL ---------------------------------------------------------------------------------------------------------


def worker_trl(args) -> dict:
    t0 = time.perf_counter()
    load_start = _load()
    import peft
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from preflexor.checkpoint import default_model_dir

    transformers.logging.set_verbosity_error()
    model_dir = str(default_model_dir())
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(TARGETS),
                           bias="none", task_type="CAUSAL_LM")
    examples = make_examples(PAIRS * (args.warmup + args.steps))
    mem = TrainMemory()
    times: dict[str, list[float]] = {"wall": [], "cpu": []}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            mem.start()

        def on_step_begin(self, a, state, control, **kw):
            _lockstep_wait(args, len(times["wall"]))
            self.w0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            times["wall"].append(time.perf_counter() - self.w0)
            times["cpu"].append(time.process_time() - self.c0)
            _lockstep_done(args, len(times["wall"]) - 1, times["wall"][-1])

    common = dict(output_dir=tempfile.mkdtemp(prefix="bench_train_"), per_device_train_batch_size=PAIRS,
                  gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
                  max_grad_norm=MAX_GRAD_NORM, beta=BETA, max_length=PROMPT + max(CHOSEN, REJECTED),
                  gradient_checkpointing=args.gc == 1, bf16=False, fp16=False, use_cpu=True, torch_compile=False,
                  logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
                  dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False, seed=SEED)
    if args.loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        class IdsORPOTrainer(ORPOTrainer):
            """ORPOTrainer fed token ids: emits the features of `ORPOTrainer.tokenize_row` from the id columns."""

            def tokenize_row(self, feature, model=None):
                p, c, r = feature["p_ids"], feature["c_ids"], feature["r_ids"]
                out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
                for side, ids in (("chosen", c), ("rejected", r)):
                    out[f"{side}_input_ids"] = p + ids
                    out[f"{side}_attention_mask"] = [1] * (len(p) + len(ids))
                    out[f"{side}_labels"] = [-100] * len(p) + ids
                return out

        data = Dataset.from_list([{"prompt": "", "chosen": "", "rejected": "", "p_ids": e["prompt_ids"],
                                   "c_ids": e["chosen_ids"], "r_ids": e["rejected_ids"]} for e in examples])
        config = ORPOConfig(**common)
        trainer = IdsORPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                 peft_config=lora, callbacks=[StepTimer()])
    else:
        from trl import DPOConfig, DPOTrainer

        class IdsDPOTrainer(DPOTrainer):
            """DPOTrainer fed token ids: the dataset already holds the prompt_ids/chosen_ids/rejected_ids columns
            that `_prepare_dataset` would produce from text."""

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset

        data = Dataset.from_list(examples)
        config = DPOConfig(**common, loss_type=["exo_pair"], label_smoothing=EXO_EPS, precompute_ref_log_probs=False)
        trainer = IdsDPOTrainer(model=model, ref_model=None, args=config, train_dataset=data,
                                processing_class=tokenizer, peft_config=lora, callbacks=[StepTimer()])
    setup_s = time.perf_counter() - t0
    out = trainer.train()
    memory = mem.stop()
    n = len(times["wall"])
    if n != args.warmup + args.steps:
        raise RuntimeError(f"TRL ran {n} steps, expected {args.warmup + args.steps}")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {**_summary(times["wall"][args.warmup:], times["cpu"][args.warmup:]), **memory,
            "setup_s": round(setup_s, 2), "train_loss": round(float(out.training_loss), 5), "load_start": load_start,
            "load_end": _load(), "threads": torch.get_num_threads(), "trainable_params": trainable,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__}}


# -- profile -----------------------------------------------------------------------------------------------------


def profile_ours(loss: str, gc_on: bool, top: int, new_token_rows: bool = False) -> dict:
    """torch.profiler over one of our steps after two warm-up steps; top ops by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from preflexor.data import collate_pairs

    model, tok, rt, spec, optimizer = _ours_setup(loss, gc_on, new_token_rows)
    trainable = [p for p in model.parameters() if p.requires_grad]
    examples = make_examples(PAIRS * 3)
    for i in range(2):
        _ours_step(model, collate_pairs(examples[i * PAIRS:(i + 1) * PAIRS], tok.pad_id), spec, LOSS_NAMES[loss], rt,
                   optimizer, trainable)
    batch = collate_pairs(examples[2 * PAIRS:], tok.pad_id)
    w0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _ours_step(model, batch, spec, LOSS_NAMES[loss], rt, optimizer, trainable)
    wall = time.perf_counter() - w0
    avg = prof.key_averages(group_by_input_shape=True)
    print(avg.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40,
                    max_shapes_column_width=60), file=sys.stderr)
    rows = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"profile": f"ours_{loss}_gc{int(gc_on)}" + ("_rows" if new_token_rows else ""), "step_s": round(wall, 3),
            "top_ops": [{"op": e.key, "shapes": str(e.input_shapes)[:120], "calls": e.count,
                         "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
                         "cpu_total_ms": round(e.cpu_time_total / 1e3, 1)} for e in rows]}


# -- driver ------------------------------------------------------------------------------------------------------


def run_worker(framework: str, loss: str, gc_on: int, args) -> dict:
    cmd, env = _worker_cmd_env(framework, loss, gc_on, args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"error": tail[-1] if tail else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_cmd_env(framework: str, loss: str, gc_on: int, args) -> tuple[list[str], dict]:
    cmd = [sys.executable, __file__, "--worker", framework, "--loss", loss, "--gc-one", str(gc_on),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.new_token_rows and framework == "ours":
        cmd.append("--new-token-rows")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.malloc_mmap_threshold and (args.malloc_scope == "both" or framework == "ours"):
        # a fixed glibc mmap threshold turns off its dynamic threshold, so freed activation buffers go back to the
        # kernel instead of fragmenting the heap (peak RSS); both trainers allocate through glibc malloc on CPU
        env.update(MALLOC_MMAP_THRESHOLD_=str(args.malloc_mmap_threshold),
                   MALLOC_TRIM_THRESHOLD_=str(args.malloc_mmap_threshold))
    return cmd, env


def _read_json_line(proc, key: str) -> dict:
    """The next stdout line of a worker that is a JSON object holding `key` (other output is skipped)."""
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(msg, dict) and key in msg:
            return msg
    raise RuntimeError(f"worker exited before sending {key!r}")


def run_lockstep(loss: str, gc_on: int, args) -> tuple[dict, dict, list[float]]:
    """Both frameworks' workers alive at once, taking turns step by step (the order alternates every step): paired
    step times under the same machine conditions. Returns each worker's summary and TRL/ours per timed step."""
    procs, errs = {}, {}
    for fw in ("ours", "trl"):
        cmd, env = _worker_cmd_env(fw, loss, gc_on, args)
        errs[fw] = tempfile.TemporaryFile(mode="w+")
        procs[fw] = subprocess.Popen(cmd + ["--lockstep"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=errs[fw], text=True, env=env, cwd=ROOT)
    walls: dict[str, list[float]] = {"ours": [], "trl": []}
    try:
        for i in range(args.warmup + args.steps):
            order = ("ours", "trl") if i % 2 == 0 else ("trl", "ours")
            for fw in order:  # both ready (set-ups done, last step finished) before either starts
                _read_json_line(procs[fw], "wait")
            for fw in order:
                procs[fw].stdin.write("go\n")
                procs[fw].stdin.flush()
                walls[fw].append(_read_json_line(procs[fw], "done")["wall"])
        summaries = {fw: _read_json_line(procs[fw], "framework") for fw in procs}
    except (RuntimeError, BrokenPipeError) as e:
        failed = {}
        for fw, p in procs.items():
            p.kill()
            p.wait()
            errs[fw].seek(0)
            tail = [ln for ln in errs[fw].read().splitlines() if ln.strip()]
            failed[fw] = {"error": tail[-1] if tail else str(e)}
        return failed["ours"], failed["trl"], []
    for p in procs.values():
        p.wait()
    paired = [t / o for o, t in zip(walls["ours"][args.warmup:], walls["trl"][args.warmup:])]
    return summaries["ours"], summaries["trl"], paired


def _med(runs: list[dict], key: str) -> dict:
    xs = [r[key] for r in runs]
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}


def aggregate(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out = {"n": len(ok), "errors": [r["error"] for r in runs if "error" in r]}
    if not ok:
        return out
    for key in ("tokens_per_s", "tokens_per_s_median_step", "fwd_tokens_per_s", "s_per_step_mean",
                "s_per_step_median", "cpu_s_per_step_median", "peak_rss_mb", "train_growth_mb", "setup_s"):
        out[key] = _med(ok, key)
    out["runs"] = [{k: r[k] for k in ("tokens_per_s", "peak_rss_mb", "train_growth_mb", "step_s", "load_start",
                                      "load_end") if k in r} for r in ok]
    for key in ("threads", "trainable_params", "versions", "first_loss", "last_loss", "train_loss", "leaked_modules"):
        if key in ok[-1]:
            out[key] = ok[-1][key]
    return out


def run_config(loss: str, gc_on: int, args) -> dict:
    load_start = _load()
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    paired: list[float] = []
    for _ in range(args.repeats):
        if args.lockstep:
            ours, trl, ratios = run_lockstep(loss, gc_on, args)
            runs["ours"].append(ours)
            runs["trl"].append(trl)
            paired += ratios
            continue
        for fw in ("ours", "trl"):  # interleaved, so both see similar machine load
            runs[fw].append(run_worker(fw, loss, gc_on, args))
    res = {"config": f"{loss}_gc{gc_on}", "loss": loss, "gc": gc_on, "pairs": PAIRS,
           "lengths": [PROMPT, CHOSEN, REJECTED], "tokens_per_step": TOKENS_PER_STEP, "steps": args.steps,
           "warmup": args.warmup, "repeats": args.repeats, "new_token_rows": args.new_token_rows,
           "threads": args.threads or None, "malloc_mmap_threshold": args.malloc_mmap_threshold,
           "malloc_scope": args.malloc_scope if args.malloc_mmap_threshold else None,
           "load_start": load_start, "load_end": _load(), "cpu_count": os.cpu_count()}
    res["ours"], res["trl"] = aggregate(runs["ours"]), aggregate(runs["trl"])
    o, t = res["ours"], res["trl"]
    if o["n"] and t["n"]:
        res["ratio_tokens_per_s"] = round(o["tokens_per_s"]["median"] / t["tokens_per_s"]["median"], 3)
        # from each process's median step: robust to the odd step stalled by another process on a shared machine
        res["ratio_tokens_per_s_median_step"] = round(o["tokens_per_s_median_step"]["median"]
                                                      / t["tokens_per_s_median_step"]["median"], 3)
        res["ratio_cpu_s_per_step"] = round(o["cpu_s_per_step_median"]["median"]
                                            / t["cpu_s_per_step_median"]["median"], 3)
        res["ratio_peak_rss"] = round(o["peak_rss_mb"]["median"] / t["peak_rss_mb"]["median"], 3)
        res["ratio_train_growth"] = round(o["train_growth_mb"]["median"] / max(t["train_growth_mb"]["median"], 1e-9), 3)
        # per repeat (ours run i next to TRL run i): the spread of the ratio under changing load
        pairs = [(a, b) for a, b in zip(runs["ours"], runs["trl"]) if "error" not in a and "error" not in b]
        res["ratio_tokens_per_s_per_repeat"] = [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in pairs]
    if paired:  # --lockstep: TRL's step time over ours, step by step
        res["lockstep"] = True
        res["ratio_tokens_per_s_paired_steps"] = {"median": round(statistics.median(paired), 3),
                                                  "min": round(min(paired), 3), "max": round(max(paired), 3),
                                                  "n": len(paired)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--losses", default="orpo,exo", help="comma list of orpo, exo")
    ap.add_argument("--gc", default="0,1", help="gradient checkpointing settings, comma list of 0, 1")
    ap.add_argument("--repeats", type=int, default=3, help="processes per framework and configuration")
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument("--new-token-rows", action="store_true",
                    help="ours also trains the 8 reasoning tokens' embedding rows, as configs/stage1_orpo.yaml does "
                         "(not comparable with TRL, which trains LoRA only)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch/OpenMP threads in every worker (0: torch's default, one per core); 1 makes process "
                         "CPU seconds a usable work measure on a loaded machine (no OpenMP spin-waiting)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=0, metavar="BYTES",
                    help="run the workers with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ = BYTES "
                         "(0: glibc default)")
    ap.add_argument("--malloc-scope", choices=("both", "ours"), default="both",
                    help="which framework's workers get --malloc-mmap-threshold (ours: preview of setting it in "
                         "preflexor's CPU runtime)")
    ap.add_argument("--lockstep", action="store_true",
                    help="run each repeat's two workers at once, alternating single steps (paired step times under "
                         "the same machine conditions; adds ratio_tokens_per_s_paired_steps)")
    ap.add_argument("--profile", action="store_true", help="profile one of our steps per configuration instead")
    ap.add_argument("--top", type=int, default=25, help="ops listed by --profile")
    ap.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--loss", choices=tuple(LOSS_NAMES), help=argparse.SUPPRESS)
    ap.add_argument("--gc-one", type=int, dest="gc_one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        args.gc = args.gc_one
        out = worker_ours(args) if args.worker == "ours" else worker_trl(args)
        print(json.dumps({"framework": args.worker, "loss": args.loss, "gc": args.gc, **out}), flush=True)
        return
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    gcs = [int(s) for s in args.gc.split(",") if s.strip()]
    bad = [x for x in losses if x not in LOSS_NAMES] + [str(g) for g in gcs if g not in (0, 1)]
    if bad or args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        ap.error(f"bad arguments: {bad or 'repeats/steps must be >= 1, warmup >= 0'}")
    for loss in losses:
        for gc_on in gcs:
            if args.profile:
                print(json.dumps(profile_ours(loss, bool(gc_on), args.top, args.new_token_rows)), flush=True)
            else:
                print(json.dumps(run_config(loss, gc_on, args)), flush=True)


if __name__ == "__main__":
    main()
