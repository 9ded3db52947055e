"""Generation speed: preflexor's sampler vs `transformers` `generate` on SmolLM2-135M-Instruct (CPU, fp32).

Both run the same converted HF directory and the same prompts (real chat prompts cut to exactly --prompt-len tokens,
so transformers needs no padding and takes its fastest path). Both generate every requested token: ours with no stop
ids, transformers with `min_new_tokens = max_new_tokens`. Runs alternate (ours, theirs, ours, ...) after one warm-up
each, so machine load hits both alike; the reported speed is new tokens per second over the median run (wall clock,
and per process-CPU second, which is steadier when other jobs share the machine).
Ours is `generate` as the scripts get it: on a float32 CPU model with the fast paths installed that is the
`cpu_infer` fast path. Its packed weights are built once per model (in the warm-up here); `pack_build_s` reports
that one-off cost. `--also-plain` adds our plain path (`fast=False`) to the interleaved runs.
One JSON line per configuration:
  b8_sample: batch 8, temperature 1, top-k 50, top-p 0.9;   b1_greedy: batch 1, greedy.

  python bench/bench_generate.py [--repeats 3] [--new-tokens 128] [--configs b8_sample,b1_greedy] [--threads N]
                                 [--also-plain]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preflexor import fast  # noqa: E402
from preflexor.fast import cpu_infer  # noqa: E402
from preflexor.checkpoint import default_model_dir, load_model, load_tokenizer  # noqa: E402
from preflexor.sampler import generate  # noqa: E402

QUESTIONS = [
    "What gives spider silk its remarkable toughness compared with steel of the same weight?",
    "Explain how collagen fibrils are organised in bone and why that matters for fracture resistance.",
    "Why does nacre resist cracking better than the aragonite mineral it is made of?",
    "How do hydrogen bonds between beta-sheet nanocrystals contribute to the strength of silk fibres?",
    "Describe the hierarchical structure of tendon from molecules to the whole tissue.",
    "What role does water play in the mechanical properties of keratin in hair and wool?",
    "Compare the elastic behaviour of elastin and resilin in animal tissues.",
    "How does mineralisation change the stiffness of cartilage at the growth plate?",
]
CONFIGS = {
    "b8_sample": dict(batch=8, temperature=1.0, top_k=50, top_p=0.9),
    "b1_greedy": dict(batch=1, temperature=0.0, top_k=None, top_p=None),
}


def prompts_of(tok, batch: int, length: int) -> list[list[int]]:
    out = []
    for i in range(batch):
        ids = tok.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] * 3}])
        out.append(ids[:length])
    return out


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(); CPU time is the steadier measure on a shared, loaded machine."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def run_ours(model, prompts, new_tokens, c, seed, fast=None) -> None:
    out = generate(model, prompts, new_tokens, temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"],
                   seed=seed, fast=fast)
    assert all(len(o[0]) == new_tokens for o in out)


def run_hf(hf, prompts, new_tokens, c, seed) -> None:
    ids = torch.tensor(prompts)
    kw = dict(do_sample=True, temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"]) \
        if c["temperature"] > 0 else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=0, **kw)
    assert out.shape[1] == ids.shape[1] + new_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=None, help="converted HF dir (default: the embedded SmolLM2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--also-plain", action="store_true", help="also time our plain path (fast=False)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    d = Path(args.model_dir) if args.model_dir else default_model_dir()
    tok = load_tokenizer(d)
    model = fast.install(load_model(d, dtype=torch.float32).eval())  # as the scripts do (fast: true)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # generate every token, as ours does without stop ids

    for name in args.configs.split(","):
        c = CONFIGS[name]
        prompts = prompts_of(tok, c["batch"], args.prompt_len)
        cpu_infer.release(model)
        build_s = timed(lambda: cpu_infer.packed(model, c["batch"]))[0] if cpu_infer.default_on(model) else 0.0
        run_ours(model, prompts, 4, c, 0)  # warm-up (allocator, thread pools)
        run_hf(hf, prompts, 4, c, 0)
        if args.also_plain:
            run_ours(model, prompts, 4, c, 0, fast=False)
        ours, theirs, plain = [], [], []
        for r in range(args.repeats):
            ours.append(timed(lambda: run_ours(model, prompts, args.new_tokens, c, r)))
            theirs.append(timed(lambda: run_hf(hf, prompts, args.new_tokens, c, r)))
            if args.also_plain:
                plain.append(timed(lambda: run_ours(model, prompts, args.new_tokens, c, r, fast=False)))
        n = c["batch"] * args.new_tokens
        o, t = n / statistics.median(w for w, _ in ours), n / statistics.median(w for w, _ in theirs)
        oc, tc = n / statistics.median(cpu for _, cpu in ours), n / statistics.median(cpu for _, cpu in theirs)
        extra = {}
        if plain:
            p_, pc = n / statistics.median(w for w, _ in plain), n / statistics.median(cpu for _, cpu in plain)
            extra = {"plain_tok_s": round(p_, 2), "plain_tok_per_cpu_s": round(pc, 2),
                     "plain_s": [round(w, 2) for w, _ in plain]}
        print(json.dumps({"bench": "generate", "config": name, "batch": c["batch"], "prompt_tokens": args.prompt_len,
                          "new_tokens": args.new_tokens, "temperature": c["temperature"], "top_k": c["top_k"],
                          "top_p": c["top_p"], "ours_tok_s": round(o, 2), "transformers_tok_s": round(t, 2),
                          "ratio": round(o / t, 3), "ours_tok_per_cpu_s": round(oc, 2),
                          "transformers_tok_per_cpu_s": round(tc, 2), "cpu_ratio": round(oc / tc, 3),
                          "ours_s": [round(w, 2) for w, _ in ours],
                          "transformers_s": [round(w, 2) for w, _ in theirs], **extra,
                          "ours_path": "cpu_infer" if cpu_infer.default_on(model) else "plain",
                          "pack_build_s": round(build_s, 2), "repeats": args.repeats,
                          "threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2),
                          "device": "cpu", "dtype": "float32", "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
