"""Benchmark the preference-loss head (LM head -> per-token log-probs -> ORPO / DPO loss), forward + backward.

Methods, all feeding the same `preflexor.losses` functions:
  eager       logits = hidden @ W.T materialised, log_softmax, gather (logprobs.token_logps_reference)
  ours        logprobs.token_logps, chunked over tokens, never holding [N, V] logits
  ours_dense  (--head rows only) token_logps on the index_put head with full autograd: stage 1 before the rows path
  liger       Liger-Kernel's LigerFusedLinearORPOLoss / LigerFusedLinearDPOLoss (compiled=False on CPU, True on CUDA)
Heads (--head): frozen = W constant (LoRA); full = W trains; rows = only K=4 rows of W train (stage 1's new
reasoning tokens, appended at the end of the vocabulary): eager and ours_dense build the head by index_put each step
and backpropagate through it, ours passes the constant head plus the rows (`token_logps(rows=, row_weight=)`),
and Liger, which has no notion of trainable rows, trains the full W (`liger_head` in the output says so).
Shapes: small = SmolLM2-135M head (N=2048 tokens, H=576, V=49152), large = Llama-3.2-3B head (N=4096, H=3072,
V=128256); N tokens = 2 pairs x 2 sequences x T, the first quarter of every row a masked prompt. DPO adds a
reference forward (no grad) through the same head on separate hidden states.

Every (configuration, method) runs in its own subprocess, so peak memory is per method: on CPU the growth of peak
RSS over the RSS after the inputs exist (the kernel's VmHWM, reset before each run through /proc/self/clear_refs;
glibc is told to mmap every block >= 128 KiB so freed memory leaves RSS at once); on CUDA
torch.cuda.max_memory_allocated over the allocated baseline. CPU runs float32, CUDA bfloat16.
Prints one JSON line per configuration: per method the median wall seconds `s`, median process CPU seconds `cpu_s`
(steadier than wall time on a shared machine) and median peak MiB; ratios ours/eager and ours/liger.

    python bench/bench_loss_head.py --sizes small --repeats 3 [--head frozen|rows|full]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from preflexor.logprobs import sequence_logps, token_logps, token_logps_reference  # noqa: E402
from preflexor.losses import dpo_loss, orpo_loss  # noqa: E402

SIZES = {"small": dict(N=2048, H=576, V=49152), "large": dict(N=4096, H=3072, V=128256)}
PAIRS = 2
IGNORE = -100
BETA = 0.1
K_ROWS = 4  # trained rows in --head rows: <|thinking|>, <|/thinking|>, <|reflect|>, <|/reflect|>


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def _inputs(N, H, V, device, dtype, head, method):
    """hidden [2B, T, H] (chosen rows first), reference hidden, head weight [V, H], targets [2B, T], and for the
    rows head the row ids [K] and their trainable values [K, H] (None otherwise)."""
    g = torch.Generator().manual_seed(0)
    T = N // (2 * PAIRS)
    hidden = torch.randn(2 * PAIRS, T, H, generator=g).to(device, dtype).requires_grad_()  # [2B, T, H], chosen first
    ref_hidden = torch.randn(2 * PAIRS, T, H, generator=g).to(device, dtype)
    weight_grad = head == "full" or (head == "rows" and method == "liger")
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype).requires_grad_(weight_grad)  # [V, H]
    target = torch.randint(0, V, (2 * PAIRS, T), generator=g)
    target[:, : T // 4] = IGNORE  # prompt tokens
    rows = row_weight = None
    if head == "rows":
        cols = torch.arange(T // 4, T, T // 8)  # a few response positions predict a new token, as thinking tags do
        target[:, cols] = V - K_ROWS + torch.arange(len(cols)) % K_ROWS
        if method != "liger":
            rows = torch.arange(V - K_ROWS, V, device=device)
            row_weight = weight.detach()[rows].clone().requires_grad_()  # [K, H]
    return hidden, ref_hidden, weight, target.to(device), rows, row_weight


def _step_ours_or_eager(method, loss, hidden, ref_hidden, weight, target, rows, row_weight):
    mask = target != IGNORE
    if rows is None:
        head, extra = weight, {}
    elif method == "ours":  # constant head holding the rows (what Transformer.head_parts returns) + the rows
        with torch.no_grad():
            head = weight.index_put((rows,), row_weight)
        extra = {"rows": rows, "row_weight": row_weight}
    else:  # the rows written into the head with autograd through index_put (LoRAEmbedding.rows_weight)
        head, extra = weight.index_put((rows,), row_weight), {}
    logps_fn = token_logps_reference if method == "eager" else token_logps
    tok = logps_fn(hidden, head, target, **extra)  # [2B, T]
    if loss == "orpo":
        chosen, rejected = sequence_logps(tok, mask, average=True).chunk(2)
        # Liger's NLL convention (one token mean over all chosen rows), spread over pairs so the mean matches it
        chosen_nll = -(tok[:PAIRS] * mask[:PAIRS]).sum(dim=1) * PAIRS / mask[:PAIRS].sum()
        losses, _ = orpo_loss(chosen, rejected, chosen_nll, beta=BETA)
    else:
        chosen, rejected = sequence_logps(tok, mask, average=False).chunk(2)
        with torch.no_grad():
            ref_tok = logps_fn(ref_hidden, head, target)
            ref_chosen, ref_rejected = sequence_logps(ref_tok, mask, average=False).chunk(2)
        losses, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=BETA)
    losses.mean().backward()


def _make_liger(loss, compiled):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearORPOLoss

    if loss == "orpo":
        fn = LigerFusedLinearORPOLoss(ignore_index=IGNORE, beta=BETA, compiled=compiled)
        return lambda hidden, ref_hidden, weight, target, *_: fn(weight, hidden, target)[0].backward()
    fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, compiled=compiled, use_ref_model=True)
    return lambda hidden, ref_hidden, weight, target, *_: fn(weight, hidden, target, ref_input=ref_hidden,
                                                             ref_weight=weight.detach())[0].backward()


def worker(args) -> dict:
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tensors = _inputs(**SIZES[args.size], device=device, dtype=dtype, head=args.head, method=args.method)
    if args.method == "liger":
        step = _make_liger(args.loss, compiled=cuda)
    else:
        def step(*xs):
            _step_ours_or_eager(args.method, args.loss, *xs)
    times, cpu_times, peaks = [], [], []
    for i in range(args.warmup + args.repeats):
        for t in (tensors[0], tensors[2], tensors[5]):  # hidden, weight, row_weight
            if t is not None:
                t.grad = None
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = _status_mib("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        step(*tensors)
        if cuda:
            torch.cuda.synchronize()
        dt, cpu_dt = time.perf_counter() - t0, time.process_time() - c0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _status_mib("VmHWM") - base
        if i >= args.warmup:
            times.append(dt)
            cpu_times.append(cpu_dt)
            peaks.append(peak)
    return {"s": round(statistics.median(times), 4), "cpu_s": round(statistics.median(cpu_times), 4),
            "peak_mib": round(statistics.median(peaks), 1), "runs_s": [round(t, 3) for t in times],
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()}


def run_config(size, loss, args) -> dict:
    result = {"size": size, "loss": loss, **SIZES[size], "pairs": PAIRS, "head": args.head,
              "weight_grad": args.head == "full", "repeats": args.repeats}
    if args.head == "rows":
        result.update(rows=K_ROWS, liger_head="full (Liger has no trainable-rows option)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", "--size", size, "--loss", loss, "--method", method,
               "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--device", args.device,
               "--head", args.head]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            result[method] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(device=out.pop("device"), dtype=out.pop("dtype"), threads=out.pop("threads"))
        result[method] = out
    for other in ("eager", "liger", "ours_dense"):
        if "s" in result.get("ours", {}) and "s" in result.get(other, {}):
            result[f"time_ours/{other}"] = round(result["ours"]["s"] / result[other]["s"], 3)
            result[f"cpu_time_ours/{other}"] = round(result["ours"]["cpu_s"] / result[other]["cpu_s"], 3)
            result[f"mem_ours/{other}"] = round(result["ours"]["peak_mib"] / result[other]["peak_mib"], 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", choices=["small", "large", "all"], default="small")
    p.add_argument("--losses", default="orpo,dpo")
    p.add_argument("--methods", help="comma list of eager,ours,ours_dense,liger (default: eager,ours,liger, "
                   "plus ours_dense with --head rows)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--head", choices=["frozen", "rows", "full"], default="frozen",
                   help="what of the head trains: nothing (LoRA, default), K=4 new-token rows (stage 1), all of W")
    p.add_argument("--weight-grad", action="store_true", help="same as --head full (kept for older commands)")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--loss", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.weight_grad:
        if args.head not in ("frozen", "full"):
            p.error("--weight-grad means --head full")
        args.head = "full"
    if args.methods is None:
        args.methods = "eager,ours,liger" + (",ours_dense" if args.head == "rows" else "")
    unknown = set(args.methods.split(",")) - {"eager", "ours", "ours_dense", "liger"}
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sizes = ["small", "large"] if args.sizes == "all" else [args.sizes]
    for size in sizes:
        for loss in args.losses.split(","):
            print(json.dumps(run_config(size, loss, args)), flush=True)


if __name__ == "__main__":
    main()
