"""One command for one GPU (`make gpu-check`): what runs on CUDA, how right and how fast, one JSON line per item.

    python3 bench/gpu_check.py [--out bench/gpu_check.jsonl] [--tokenizer PATH/tokenizer.json]
    python3 bench/gpu_check.py --tiny --out /tmp/check.jsonl      # the same items, tiny shapes, on the CPU (a test)

Items: (a) versions; (b) the Triton log-prob kernels in bf16 at V = 128256 with N * V > 2^31, for a frozen head, a
trained head and trained new-token rows, against a float32 reference; (c) the loss head's time and peak memory
against eager and Liger-Kernel (when importable); (d) a Llama-3.2-3B-shaped model with random weights: a LoRA r=64
ORPO step with gradient checkpointing (s/step, tokens/s, peak GiB, MFU = 6 * matmul params * tokens / time / the
card's dense bf16 peak: the Kaplan convention, attention's T^2 term and the checkpointing recompute not counted), the
share of adapter elements that one step moves at lr 5e-5 and 5e-7, and EXO's step-0 policy == reference; (e) the
sampler on that model (batch 16 sampling, batch 1 greedy, ms per token); (f) the real scripts on a tiny random model:
train_orpo.py, its resume, train_dpo.py. An item that fails writes its error and the next one runs.

It needs a CUDA PyTorch (2.5 or newer) with Triton and nothing of our venv: no download, no GGUF, no corpus; (f) needs
a tokenizer.json (default: the converted SmolLM2's in $PREFLEXOR_CACHE, else bench/assets/tokenizer.json).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense TFLOP/s of the SXM parts


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(dev) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if dev.type == "cuda" else None


# -- (a) ---------------------------------------------------------------------------------------------------------------

def versions(dev, tiny) -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    out = {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count)
    return out


# -- (b) ---------------------------------------------------------------------------------------------------------------

def kernels(dev, tiny) -> dict:
    """token_logps(impl="triton") in bf16 against the float32 eager reference, three head modes."""
    from preflexor.logprobs import token_logps, token_logps_reference

    N, H, V = (96, 32, 1000) if tiny else (16800, 3072, 128256)  # 16800 * 128256 > 2^31: int64 offsets needed
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(dev, torch.bfloat16)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5 * 4).to(dev, torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g).to(dev)
    labels[::7] = -100
    rows = torch.arange(V - 8, V, device=dev)
    labels[1::5] = V - 8 + torch.arange(len(labels[1::5]), device=dev) % 8
    grad_out = torch.randn(N, generator=g).to(dev)
    out = {"N": N, "H": H, "V": V, "N*V": N * V, "over_2^31": N * V > 2**31}
    for mode in ("frozen", "weight_grad", "rows"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(mode == "weight_grad")
        rw = weight[rows].clone().requires_grad_() if mode == "rows" else None
        got = token_logps(h, w, labels, impl="triton", **({"rows": rows, "row_weight": rw} if rw is not None else {}))
        (got * grad_out).sum().backward()
        # reference: float32 everywhere, in row blocks (the full [N, V] float32 logits would be 8.6 GB)
        hf, wf = hidden.float().requires_grad_(), weight.float().requires_grad_(mode != "frozen")
        ref = torch.cat([token_logps_reference(hf[i:i + 2048], wf, labels[i:i + 2048]) for i in range(0, N, 2048)])
        (ref * grad_out).sum().backward()
        rel = lambda a, b: float((a.float() - b).norm() / b.norm().clamp(min=1e-30))  # noqa: E731
        with torch.no_grad():  # the eager path in bf16 (bf16 GEMM, float32 softmax): what "bf16 accuracy" means here
            eager = torch.cat([token_logps_reference(hidden[i:i + 2048], weight, labels[i:i + 2048])
                               for i in range(0, N, 2048)])
        res = {"logp_max_abs_err": float((got.detach() - ref.detach()).abs().max()),
               "eager_bf16_logp_max_abs_err": float((eager - ref.detach()).abs().max()),
               "grad_hidden_rel_err": rel(h.grad, hf.grad)}
        if mode == "weight_grad":
            res["grad_weight_rel_err"] = rel(w.grad, wf.grad)
        if mode == "rows":
            res["grad_rows_rel_err"] = rel(rw.grad, wf.grad[rows])
        out[mode] = res
        del h, w, rw, got, hf, wf, ref, eager
    return out


# -- (c) ---------------------------------------------------------------------------------------------------------------

def loss_head(dev, tiny) -> dict:
    """The ORPO loss head forward + backward (bench_loss_head.py's steps), median of 3 after one warm-up."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_loss_head as blh

    N, H, V = (64, 32, 1000) if tiny else (4096, 3072, 128256)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out = {"N": N, "H": H, "V": V, "dtype": str(dtype).removeprefix("torch."), "loss": "orpo", "head": "frozen"}
    for method in ("ours", "eager", "liger"):
        try:
            step = blh._make_liger("orpo", compiled=dev.type == "cuda") if method == "liger" else (
                lambda *xs, m=method: blh._step_ours_or_eager(m, "orpo", *xs))
        except ImportError:
            out[method] = "not importable"
            continue
        xs = blh._inputs(N, H, V, dev, dtype, "frozen", method)
        times, peaks = [], []
        for i in range(4):
            xs[0].grad = None
            _peak_reset(dev)
            base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
            t0 = time.perf_counter()
            step(*xs)
            _sync(dev)
            if i:
                times.append(time.perf_counter() - t0)
                peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else None)
        out[method] = {"ms": round(1e3 * statistics.median(times), 2),
                       "peak_mib": None if peaks[0] is None else round(statistics.median(peaks), 1)}
    for other in ("eager", "liger"):
        if isinstance(out.get(other), dict):
            out[f"time_ours/{other}"] = round(out["ours"]["ms"] / out[other]["ms"], 3)
            if out["ours"]["peak_mib"] is not None:
                out[f"mem_ours/{other}"] = round(out["ours"]["peak_mib"] / out[other]["peak_mib"], 3)
    return out


# -- (d), (e) ----------------------------------------------------------------------------------------------------------

def _model(dev, tiny):
    from preflexor import fast
    from preflexor.model import ModelArgs, Transformer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the run's dtype (a 3B model in float32 first would be 13 GB)
    try:
        with torch.device(dev):
            model = Transformer(ModelArgs(**(TINY if tiny else LLAMA_3B)))
    finally:
        torch.set_default_dtype(default)
    return fast.install(model)


def _batch(n_pairs, P, R, V):
    from preflexor.data import collate_pairs

    g = torch.Generator().manual_seed(1)
    ex = [{"prompt_ids": torch.randint(3, V, (P,), generator=g).tolist(),
           "chosen_ids": torch.randint(3, V, (R,), generator=g).tolist(),
           "rejected_ids": torch.randint(3, V, (R,), generator=g).tolist()} for _ in range(n_pairs)]
    return collate_pairs(ex, 0)


def training_step(dev, tiny) -> dict:
    from preflexor.config import LossConfig
    from preflexor.lora import apply_lora
    from preflexor.optim import build_optimizer
    from preflexor.preference import policy_logps, preference_loss, reference_logps
    from preflexor.losses import get_loss
    from preflexor.runtime import Runtime

    model = _model(dev, tiny)
    cfg = model.config
    P, R, pairs = (16, 32, 2) if tiny else (256, 512, 2)
    batch = _batch(pairs, P, R, cfg.vocab_size)
    rt = Runtime(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32,
                 torch.bfloat16 if dev.type == "cuda" else None)
    apply_lora(model, 8 if tiny else 64, 16 if tiny else 128, 0.0)
    model.gradient_checkpointing = True
    out = {"model": "tiny" if tiny else "llama-3.2-3b-shaped, random weights", "lora_r": 8 if tiny else 64,
           "tokens_per_step": int(batch["attention_mask"].sum()), "pairs": pairs, "prompt": P, "response": R}
    # EXO at step 0: fresh adapters (B = 0) leave the policy exactly the reference
    spec = get_loss("exo_pair")
    model.eval()
    with torch.no_grad():
        pol, ref = policy_logps(model, batch, spec, rt), reference_logps(model, batch, spec, rt)
    out["exo_step0_policy_minus_reference_max"] = float(max((pol[k] - ref[k]).abs().max() for k in ref))
    model.train()
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 2)
    for lr in (5e-5, 5e-7):
        trial = copy.deepcopy(model) if lr == 5e-7 else model
        with torch.no_grad():  # B as after some training, so every adapter tensor gets a gradient
            for n, p in trial.named_parameters():
                if n.endswith("lora_b"):
                    p.normal_(0, 1e-3)
        opt = build_optimizer(trial, lr, 0.0, dev)
        adapters = {n: p for n, p in trial.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in adapters.items()}
        times = []

        def step():
            opt.zero_grad(set_to_none=True)
            losses, _ = preference_loss(trial, batch, LossConfig(name="orpo"), rt)
            losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(list(adapters.values()), 1.0)
            opt.step()
            _sync(dev)
            return losses

        for i in range(4 if lr == 5e-5 else 1):
            _peak_reset(dev)
            t0 = time.perf_counter()
            losses = step()
            times.append(time.perf_counter() - t0)
            if i == 0:
                moved = {kind: [] for kind in ("lora_a", "lora_b")}
                for n, p in adapters.items():
                    moved[n.rpartition(".")[2]].append(float((p.detach() != before[n]).float().mean()))
                out[f"moved_after_one_step_lr{lr:g}"] = {k: round(sum(v) / len(v), 4) for k, v in moved.items()}
                out["adapter_dtype"] = str(next(iter(adapters.values())).dtype).removeprefix("torch.")
        if lr == 5e-5:
            s = statistics.median(times[1:])
            out.update(s_per_step=round(s, 3), tokens_per_s=round(out["tokens_per_step"] / s, 1),
                       peak_gib=_peak_gib(dev), loss=round(float(losses.detach().mean()), 4))
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
            peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
            out["mfu"] = round(6 * matmul_params * out["tokens_per_step"] / s / peak, 4) if peak else None
            out["mfu_convention"] = "6 * matmul params * tokens / s / dense bf16 peak (no attention T^2, no recompute)"
            if dev.type == "cuda":  # the same step with cuDNN's attention left out, as generation does
                from preflexor.sampler import decode_attention

                with decode_attention(dev):
                    step()
                    t = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        step()
                        t.append(time.perf_counter() - t0)
                out["s_per_step_without_cudnn_sdpa"] = round(statistics.median(t), 3)
        del trial
    return out


def sampling(dev, tiny) -> dict:
    from preflexor.sampler import generate_ex

    model = _model(dev, tiny).eval()
    V, new = model.config.vocab_size, (16 if tiny else 128)
    g = torch.Generator().manual_seed(2)
    out = {"new_tokens": new, "prompt": 64}
    for name, B, kw in (("b16_sample", 16, dict(temperature=1.0, top_k=50, top_p=0.9, seed=0)),
                        ("b1_greedy", 1, dict(temperature=0.0))):
        prompts = [torch.randint(3, V, (64,), generator=g).tolist() for _ in range(B)]
        generate_ex(model, prompts, 4, **kw)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        res = generate_ex(model, prompts, new, **kw)
        _sync(dev)
        dt = time.perf_counter() - t0
        steps = max(len(s) for p in res.tokens for s in p)
        out[name] = {"ms_per_token": round(1e3 * dt / max(steps, 1), 2),
                     "tokens_per_s": round(res.completion_tokens / dt, 1)}
    return out


def decode(dev, tiny) -> dict:
    """Where a decode step's time goes: the launch latency of one tiny kernel, our batch-1 greedy step eager (with
    the sampler's SDPA backends and with any backend) and under `compile=True`, `transformers` generate on the same weights (when importable), and the profiler's top ops
    of a few eager steps (printed, not kept)."""
    from preflexor.sampler import generate_ex

    x = torch.zeros(8, device=dev)
    for _ in range(10):
        x.add_(1)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(2000):
        x.add_(1)
    _sync(dev)
    out = {"launch_us": round(1e6 * (time.perf_counter() - t0) / 2000, 2)}
    model = _model(dev, tiny).eval()
    V, new = model.config.vocab_size, (8 if tiny else 64)
    prompt = [torch.randint(3, V, (64,), generator=torch.Generator().manual_seed(2)).tolist()]

    def timed(fn):
        fn(new)  # warm-up, at the timed shape (a compiled step is specialised to the cache length)
        _sync(dev)
        t0 = time.perf_counter()
        n = fn(new)
        _sync(dev)
        return round(1e3 * (time.perf_counter() - t0) / n, 2)

    out["ours_eager_ms_per_token"] = timed(lambda n: len(generate_ex(model, prompt, n).tokens[0][0]))
    if dev.type == "cuda":
        from preflexor import sampler

        kept, sampler.DECODE_SDPA_BACKENDS = sampler.DECODE_SDPA_BACKENDS, ()
        try:  # every SDPA backend allowed (cuDNN's included), as before the decode setting
            out["ours_eager_any_sdpa_ms_per_token"] = timed(lambda n: len(generate_ex(model, prompt, n).tokens[0][0]))
        finally:
            sampler.DECODE_SDPA_BACKENDS = kept
        try:
            out["ours_compiled_ms_per_token"] = timed(
                lambda n: len(generate_ex(model, prompt, n, compile=True).tokens[0][0]))
        except Exception as e:  # noqa: BLE001 -- a compile failure is a finding, not the end of the item
            out["ours_compiled_ms_per_token"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        out["transformers_ms_per_token"] = "not importable"
    else:
        cfg = dict(TINY if tiny else LLAMA_3B)
        default = torch.get_default_dtype()
        torch.set_default_dtype(next(model.parameters()).dtype)
        try:
            with torch.device(dev):
                hf = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
        finally:
            torch.set_default_dtype(default)
        hf.load_state_dict(model.state_dict(), strict=False)
        ids = torch.tensor(prompt, device=dev)

        def hf_run(n):
            with torch.inference_mode():
                return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False).shape[1] - ids.shape[1]
        out["transformers_ms_per_token"] = timed(hf_run)
        del hf
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        generate_ex(model, prompt, 8)
        _sync(dev)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr, flush=True)
    events = prof.key_averages()
    out["profile_8_tokens"] = {"self_cpu_ms": round(sum(e.self_cpu_time_total for e in events) / 1e3, 1),
                               "top_self_cpu": [(e.key, round(e.self_cpu_time_total / 1e3, 2), e.count)
                                                for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]]}
    return out


# -- (f) ---------------------------------------------------------------------------------------------------------------

def scripts(dev, tiny, tokenizer: Path | None) -> dict:
    """train_orpo.py -> its resume -> train_dpo.py on a tiny random model, on this device."""
    from preflexor.checkpoint import load_tokenizer, save_model
    from preflexor.model import ModelArgs, Transformer

    if tokenizer is None or not tokenizer.is_file():
        return {"skipped": f"no tokenizer.json ({tokenizer}); pass --tokenizer"}
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    tok = load_tokenizer(tokenizer.parent)
    torch.manual_seed(0)
    save_model(Transformer(ModelArgs(**{**TINY, "vocab_size": tok.vocab_size})), tok, work / "base")
    words = "bone collagen enamel keratin tendon cartilage mineral fibre".split()
    with open(work / "pairs.jsonl", "w") as f:
        for i in range(8):
            a, b = words[i % 8], words[(i + 3) % 8]
            f.write(json.dumps({"prompt": f"How does {a} relate to {b}? Use <|thinking|>.",
                                "chosen": f"<|thinking|>\n{a} and {b}.\n<|/thinking|>\n{a} relates to {b}.",
                                "rejected": f"{b} is unrelated."}) + "\n")
    common = [f"data.pairs={work / 'pairs.jsonl'}", "data.heldout_pairs=2", "train.steps_per_iteration=2",
              "train.batch_size=2", "train.grad_accum=1", "train.save_every=1", "train.eval_generations=1",
              "train.eval_max_new_tokens=4", "train.eval_answers=0", "lora.r=4", "lora.alpha=8", "data.max_length=96",
              f"train.device={dev.type}", f"model.dtype={'bfloat16' if dev.type == 'cuda' else 'float32'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = [("stage1", "train_orpo.py", "configs/stage1_orpo.yaml", [f"model.source={work / 'base'}",
                                                                       "train.iterations=1"]),
            ("stage1_resume", "train_orpo.py", "configs/stage1_orpo.yaml", [f"model.source={work / 'base'}",
                                                                              "train.iterations=2"]),
            ("stage2", "train_dpo.py", "configs/stage2_exo.yaml",
             [f"model.source={work / 's1' / 'final' / 'model'}", "train.iterations=1"])]
    out = {}
    for name, script, config, extra in runs:
        od = work / ("s2" if name == "stage2" else "s1")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / script), "--config", config, *common, *extra,
                            f"train.out_dir={od}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        losses = [m["loss"] for m in map(json.loads, (od / "metrics.jsonl").read_text().splitlines())
                  if "loss" in m] if (od / "metrics.jsonl").is_file() else []
        out[name] = {"rc": r.returncode, "s": round(time.perf_counter() - t0, 1), "losses": losses,
                     "resumed": "resumed from" in r.stdout, "device_line": next(
                         (x for x in r.stdout.splitlines() if x.startswith("device:")), None)}
        if r.returncode:
            out[name]["stderr"] = r.stderr.strip().splitlines()[-3:]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "gpu_check.jsonl"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (Triton under TRITON_INTERPRET=1)")
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer.json for the scripts item")
    ap.add_argument("--only", help="comma list of items (versions,kernels,loss_head,training_step,sampling,decode,scripts)")
    args = ap.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("error: no CUDA device (use --tiny for the CPU check)", file=sys.stderr)
        return 2
    else:
        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.tokenizer is None:
        cache = Path(os.environ.get("PREFLEXOR_CACHE") or Path.home() / ".cache" / "preflexor")
        found = [p for p in (cache / "smollm2-135m-instruct" / "tokenizer.json", ROOT / "bench" / "assets" /
                             "tokenizer.json") if p.is_file()]
        args.tokenizer = found[0] if found else None
    items = {"versions": versions, "kernels": kernels, "loss_head": loss_head, "training_step": training_step,
             "sampling": sampling, "decode": decode, "scripts": lambda d, t: scripts(d, t, args.tokenizer)}
    chosen = args.only.split(",") if args.only else list(items)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    with open(out, "a", encoding="utf-8") as f:
        for name in chosen:
            t0 = time.perf_counter()
            try:
                rec = {"item": name, **items[name](dev, args.tiny)}
            except Exception as e:  # noqa: BLE001 -- one broken item must not hide the others
                failed += 1
                rec = {"item": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                       "where": traceback.format_exc().strip().splitlines()[-3:]}
            rec.update(seconds=round(time.perf_counter() - t0, 1), device=str(dev),
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            line = json.dumps(rec)
            print(line, flush=True)
            f.write(line + "\n")
            f.flush()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
