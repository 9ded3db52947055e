"""The training engine: exact resume after SIGKILL, accumulation invariance, torchrun/gloo parity, and bad input.

Every script run here is a real subprocess on a tiny random Llama (2 layers, hidden 64, SmolLM2's tokenizer) and a
small preference JSONL, so the whole file takes about a minute on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preflexor.graph import KnowledgeGraph

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_pairs(path: Path, n: int = 12, bad_line: int | None = None) -> Path:
    rng = random.Random(0)
    words = "bone collagen enamel keratin tendon cartilage mineral fibre stiffness toughness".split()
    lines = []
    for i in range(n):
        w = rng.sample(words, 3)
        lines.append(json.dumps({
            "prompt": f"How does {w[0]} relate to {w[1]}? Use <|thinking|>.",
            "chosen": f"<|thinking|>\n**Reasoning Steps**:\n\n{w[0]} and {w[1]} share {w[2]}.\n\n<|/thinking|>\n"
                      f"{w[0].capitalize()} relates to {w[1]} through {w[2]}.",
            "rejected": f"{w[2].capitalize()} is unrelated {i}.", "meta": {"i": i}}))
    if bad_line is not None:
        lines[bad_line - 1] = '{"prompt": "x", "chosen": 3}'
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_args(model_dir: Path, pairs: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.source={model_dir}", f"data.pairs={pairs}", "data.heldout_pairs=2", f"train.out_dir={out}",
            "train.iterations=2", "train.steps_per_iteration=3", "train.batch_size=2", "train.grad_accum=1",
            "train.lr=1e-3", "train.save_every=1", "train.keep_last=2", "train.eval_generations=1",
            "train.eval_max_new_tokens=4", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1", "data.max_length=96",
            *extra]


def run_script(script: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600, **kw)


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_resume_is_bit_identical(tmp_path, tiny_llama_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    r = run_script("train_orpo.py", tiny_args(tiny_llama_dir, pairs, ref_out))
    assert r.returncode == 0, r.stderr[-2000:]
    ref = adapter_tensors(ref_out)
    losses_ref = [m["loss"] for m in map(json.loads, (ref_out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(losses_ref) == 6

    # Kill at a random optimizer step (after a checkpoint has been written), then rerun the same command.
    kill_after = random.Random().randint(1, 5)
    p = subprocess.Popen([sys.executable, str(ROOT / "train_orpo.py"), *tiny_args(tiny_llama_dir, pairs, out)],
                         cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        ckpts = list((out / "checkpoints").glob("step_*"))
        if any(int(c.name.split("_")[1]) >= kill_after for c in ckpts):
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final").exists()
    # No checkpoint is ever half-written: every step_* directory is complete.
    for c in (out / "checkpoints").glob("step_*"):
        assert {f.name for f in c.iterdir()} == {"trainable.safetensors", "optimizer.pt", "rng.safetensors", "state.json"}

    r = run_script("train_orpo.py", tiny_args(tiny_llama_dir, pairs, out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    got = adapter_tensors(out)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), f"{k} differs after resume (killed after step {kill_after})"


def test_microbatch_accumulation_equals_full_batch(tmp_path, tiny_llama_dir):
    """1 pair x accumulation 4 gives the same updates as 4 pairs x 1 (per-example means, so padding does not matter),
    through the real script: after 2 steps (the first makes LoRA B non-zero, so the second moves every A too) the
    trainable tensors and Adam's moments (exp_avg, exp_avg_sq: the accumulated gradients) agree."""
    import train_orpo

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)

    def two_steps(out: Path, batch: int, accum: int) -> dict[str, torch.Tensor]:
        train_orpo.main(["--config", "configs/stage1_grounded.yaml", *tiny_args(tiny_llama_dir, pairs, out), "lora.r=4",
                         f"train.batch_size={batch}", f"train.grad_accum={accum}", "train.iterations=1",
                         "train.steps_per_iteration=2", "lora.dropout=0.0", "train.max_grad_norm=0",
                         "data.heldout_pairs=0", "train.save_every=1", "lora.train_new_token_rows=false"])
        before = load_file(str(out / "checkpoints" / "step_1" / "trainable.safetensors"))
        after = load_file(str(out / "checkpoints" / "step_2" / "trainable.safetensors"))
        assert all(not torch.equal(before[n], after[n]) for n in after)  # every adapter matrix moved at step 2
        opt = torch.load(out / "checkpoints" / "step_2" / "optimizer.pt", weights_only=True)
        moments = {f"{k}:{i}": v[k] for i, v in opt["state"].items() for k in ("exp_avg", "exp_avg_sq")}
        return {**after, **moments}

    full = two_steps(tmp_path / "full", batch=4, accum=1)
    micro = two_steps(tmp_path / "micro", batch=1, accum=4)
    assert full.keys() == micro.keys() and len(full) > 10
    for k in full:
        torch.testing.assert_close(micro[k], full[k], atol=1e-6, rtol=1e-4 if ":" in k else 0, msg=k)


@pytest.mark.slow
def test_torchrun_gloo_matches_single_process_with_doubled_batch(tmp_path, tiny_llama_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=10)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["train.iterations=1", "train.steps_per_iteration=3", "lora.dropout=0.0", "train.save_every=0",
              "train.eval_generations=0"]
    r = run_script("train_orpo.py", tiny_args(tiny_llama_dir, pairs, single, "train.batch_size=2", *common))
    assert r.returncode == 0, r.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + random.randint(0, 400)), str(ROOT / "train_orpo.py")]
    r = subprocess.run([*torchrun, *tiny_args(tiny_llama_dir, pairs, ddp, "train.batch_size=1", "train.device=cpu",
                                              *common)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    curve = lambda out: [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                         if "loss" in m]
    a, b = curve(single), curve(ddp)
    assert len(a) == len(b) == 3
    assert a[0] != a[-1]  # the curve moves
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-4, (a, b)
    sa, sb = adapter_tensors(single), adapter_tensors(ddp)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torchrun_ranks_share_the_active_loops_generation(tmp_path, tiny_llama_dir):
    """Under torchrun every rank generates its share of the active loop's pairs (grounded teacher, rejected answers
    sampled from the model) and of the held-out format check, gathered in index order: 2 gloo processes write the
    same pair files byte for byte and the same format-check answers as one process, and the same loss curve (one
    process with the doubled batch; float32 all-reduce, so within 1e-4)."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = [f"model.source={tiny_llama_dir}", "data.pairs=null", "data.pairs_per_iteration=4",
              "data.heldout_pairs=2", "data.kg_triples=2", "data.section_lines=1", "data.max_length=384", "data.max_prompt_len=128",
              "sample.max_new_tokens=8", "train.iterations=2", "train.steps_per_iteration=2", "train.grad_accum=1",
              "train.lr=1e-3", "train.eval_generations=2", "train.eval_max_new_tokens=4", "lora.r=4", "lora.alpha=8",
              "lora.dropout=0.0", "train.device=cpu"]
    r = run_script("train_orpo.py", ["--config", "configs/stage1_grounded.yaml", *common, f"train.out_dir={single}",
                                     "train.batch_size=2"])
    assert r.returncode == 0, r.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + random.randint(0, 400)), str(ROOT / "train_orpo.py")]
    r = subprocess.run([*torchrun, "--config", "configs/stage1_grounded.yaml", *common, f"train.out_dir={ddp}",
                        "train.batch_size=1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(p.name for p in (single / "data").iterdir() if p.is_file())
    assert files == ["heldout.jsonl", "iter_000.jsonl", "iter_001.jsonl"]
    assert sorted(p.name for p in (ddp / "data").iterdir() if p.is_file()) == files  # the ranks' shards are gone
    # the graph is an output: saved after every iteration (rank 0 only), with neighbourhood PNGs of asked concepts
    growth = [json.loads(x) for x in (single / "data" / "graph" / "growth.jsonl").read_text().splitlines()]
    assert [g["step"] for g in growth] == ["iteration 0", "iteration 1"] and growth[-1]["pngs"]
    for d in (single, ddp):
        g = KnowledgeGraph.from_graphml(d / "data" / "graph" / "graph.graphml")
        assert g.g.number_of_edges() == growth[-1]["edges"]
        assert (d / "data" / "graph" / growth[-1]["pngs"][0]).read_bytes()[:4] == b"\x89PNG"
    for name in files:
        assert (single / "data" / name).read_bytes() == (ddp / "data" / name).read_bytes(), name
    summaries = [json.loads((d / "summary.json").read_text()) for d in (single, ddp)]
    for key in ("format_before", "format_after"):
        answers = [[x["response"] for x in summary[key]["samples"]] for summary in summaries]
        assert answers[0] == answers[1] and len(answers[0]) == 2
    curve = lambda out: [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                         if "loss" in m]
    a, b = curve(single), curve(ddp)
    assert len(a) == len(b) == 4 and a[0] != a[-1]
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-4, (a, b)


def test_bad_input_is_one_line_exit_2(tmp_path, tiny_llama_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl", bad_line=5)
    cases = [
        (tiny_args(tiny_llama_dir, pairs, tmp_path / "a"), "pairs.jsonl:5"),
        (tiny_args(tiny_llama_dir, write_pairs(tmp_path / "ok.jsonl"), tmp_path / "b", "train.lrr=1"),
         "unknown config key 'train.lrr'"),
        (tiny_args(tmp_path / "no_such_model", write_pairs(tmp_path / "ok.jsonl"), tmp_path / "c"), "no_such_model"),
    ]
    for args, needle in cases:
        r = run_script("train_orpo.py", args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


@pytest.mark.parametrize("prompts,rejected,share,checkpointing,forwards", [
    ((7, 11, 4), (5, 2, 9), None, False, 2),  # prompts of different lengths: the per-half forwards are cheaper
    ((7, 11, 4), (5, 2, 9), True, False, 1),  # shared prompt forced: the masks hide the prompt block's padding
    ((9, 9, 9), (5, 2, 9), None, False, 1),  # equal prompts: shared; answers of unequal lengths: one block per half
    ((9, 9, 9), (5, 2, 9), None, True, 1),  # ... under gradient checkpointing (the layout passes through)
    ((7, 11, 4), (50, 64, 70), True, False, 1),  # answers of similar lengths: chosen + rejected in one block
    ((9, 9, 9), (50, 64, 70), None, True, 1),
])
def test_response_token_logps_equals_one_padded_forward(tiny_llama_dir, monkeypatch, prompts, rejected, share,
                                                        checkpointing, forwards):
    """Head on labelled rows after the shared-prompt forward or the per-half trimmed forwards == one forward over the
    whole padded batch + full logits, for a long chosen and a short rejected answer, with new-token rows trained
    (values and every gradient)."""
    from preflexor import fast, preference
    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.data import collate_pairs
    from preflexor.logprobs import token_logps_reference
    from preflexor.lora import apply_lora, train_new_token_rows
    from preflexor.preference import response_token_logps
    from preflexor.runtime import setup_runtime

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(tiny_llama_dir, dtype="float32")
    apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj", "down_proj"])
    train_new_token_rows(model, sorted(tok.reasoning_ids.values()))
    fast.install(model)  # the shared-prompt packing is a fast path
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    think = [tok.reasoning_ids["<|thinking|>"], tok.reasoning_ids["<|/thinking|>"]]
    ex = [{"prompt_ids": torch.randint(3, 1000, (p,), generator=g).tolist(),
           "chosen_ids": [think[0]] + torch.randint(3, 1000, (c,), generator=g).tolist() + [think[1], 5],
           "rejected_ids": torch.randint(3, 1000, (r,), generator=g).tolist()}
          for p, c, r in zip(prompts, (60, 33, 70), rejected)]
    batch = collate_pairs(ex, tok.pad_id)
    rt = setup_runtime("cpu", "float32", verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    chose = preference.worth_sharing
    taken = []
    monkeypatch.setattr(preference, "worth_sharing", lambda *a: taken.append(chose(*a) if share is None else share)
                        or taken[-1])
    model.train()
    model.gradient_checkpointing = checkpointing

    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    tl = response_token_logps(model, batch, rt)
    hook.remove()
    assert taken == [share or len(set(prompts)) == 1] and len(calls) == forwards
    model.gradient_checkpointing = False
    grads = torch.autograd.grad((tl * torch.linspace(0.5, 1.5, tl.numel()).view_as(tl)).sum(), params)
    hidden = model(batch["input_ids"], return_hidden=True)  # (2B, T, H) one padded forward
    ref = token_logps_reference(hidden, model.head_weight(), batch["targets"])
    ref_grads = torch.autograd.grad((ref * torch.linspace(0.5, 1.5, ref.numel()).view_as(ref)).sum(), params)
    assert tl.shape == ref.shape == batch["targets"].shape
    assert bool((tl[batch["targets"] == -100] == 0).all())
    torch.testing.assert_close(tl, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_new_token_rows_get_their_own_learning_rate(tiny_llama_dir):
    """`lora.new_rows_lr`: the new-token rows step at their own rate, through every schedule factor; None = lr."""
    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.lora import apply_lora, train_new_token_rows
    from preflexor.optim import build_optimizer, set_lr

    model, tok = load_model_and_tokenizer(tiny_llama_dir, dtype="float32")
    apply_lora(model, 4, 8, 0.0, ["q_proj"])
    train_new_token_rows(model, sorted(tok.reasoning_ids.values()))
    rows = model.model.embed_tokens.new_rows
    opt = build_optimizer(model, 1e-4, 0.01, torch.device("cpu"), new_rows_lr=5e-3)
    group = next(g for g in opt.param_groups if any(p is rows for p in g["params"]))
    assert group["lr"] == pytest.approx(5e-3) and group["weight_decay"] == 0.0 and len(group["params"]) == 1
    set_lr(opt, 1e-4, 0.5)  # e.g. mid-warmup
    assert group["lr"] == pytest.approx(2.5e-3)
    assert all(g["lr"] == pytest.approx(5e-5) for g in opt.param_groups if g is not group)
    # one Adam step moves each row coordinate by about its group's lr (Adam's first step is lr * sign(grad))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    before_rows, before_a = rows.detach().clone(), model.model.layers[0].self_attn.q_proj.lora_a.detach().clone()
    opt.step()
    assert float((before_rows - rows.detach()).abs().max()) == pytest.approx(2.5e-3, rel=1e-3)
    moved_a = (before_a - model.model.layers[0].self_attn.q_proj.lora_a.detach()).abs().max()
    assert float(moved_a) == pytest.approx(5e-5 + 5e-5 * 0.01 * float(before_a.abs().max()), rel=1e-2)
    default = build_optimizer(model, 1e-4, 0.0, torch.device("cpu"))
    assert {g["lr"] for g in default.param_groups} == {1e-4}


def test_keep_freed_memory_respects_glibc_switches(monkeypatch):
    """The CPU runtime keeps freed blocks in glibc's heap, unless the user set glibc's own thresholds."""
    import platform

    from preflexor.runtime import keep_freed_memory

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert keep_freed_memory() is False


def test_each_rank_generates_its_share_and_the_shares_merge_in_index_order(tmp_path, monkeypatch):
    """PairSource under a (faked) 2-rank group: rank r generates examples start + r, start + r + 2, ... into its own
    shard file, the shares are gathered and interleaved back into index order, and only rank 0 writes the merged
    file; `runtime.shard_map` does the same for any list of work (the format check)."""
    from preflexor import datagen, runtime
    from preflexor.config import RunConfig, load_config
    from preflexor.runtime import Runtime, shard_map

    calls = []

    def fake_generate_pairs(n, *a, start_index, stride, out_path, topics, context_chunks, retrieve_k, **kw):
        calls.append((n, start_index, stride, out_path.name))
        assert (topics, context_chunks, retrieve_k) == (["enamel"], 2, 5)  # the training config's data keys
        return [{"meta": {"index": start_index + stride * k}} for k in range(n)]

    monkeypatch.setattr(datagen, "generate_pairs", fake_generate_pairs)
    monkeypatch.setattr(datagen.cpu_infer, "release", lambda m: None)
    monkeypatch.setattr(datagen.dist, "barrier", lambda: None)

    def gather_as(rank):  # what the other rank contributes: its own share
        def all_gather(parts, mine):
            other = [{"meta": {"index": 10 + (1 - rank) + 2 * k}} for k in range(2 if rank == 0 else 3)]
            parts[rank], parts[1 - rank] = mine, other
        return all_gather

    cfg = load_config(RunConfig, None, ["data.topics=[enamel]", "data.context_chunks=2", "data.retrieve_k=5"])
    for rank in (0, 1):
        src = object.__new__(datagen.PairSource)
        src.cfg, src.tok, src.model, src.stage = cfg, None, torch.nn.Linear(1, 1), 1
        src.rt, src.sources = Runtime(torch.device("cpu"), torch.float32, None, rank=rank, world=2), (None,) * 5
        monkeypatch.setattr(datagen.dist, "all_gather_object", gather_as(rank))
        path = tmp_path / f"r{rank}" / "iter_000.jsonl"
        path.parent.mkdir()
        merged = src._generate(5, 10, path)
        assert [r["meta"]["index"] for r in merged] == [10, 11, 12, 13, 14]
        assert path.is_file() == (rank == 0)
    assert calls == [(3, 10, 2, "iter_000.jsonl.rank0"), (2, 11, 2, "iter_000.jsonl.rank1")]

    monkeypatch.setattr(runtime.dist, "all_gather_object", lambda parts, mine: parts.__setitem__(
        slice(None), [mine, [x * 10 for x in [1, 3]]]))
    seen = []
    out = shard_map(lambda xs: seen.append(xs) or [x * 10 for x in xs], [0, 1, 2, 3],
                    Runtime(torch.device("cpu"), torch.float32, None, rank=0, world=2))
    assert seen == [[0, 2]] and out == [0, 10, 20, 30]


def test_orpo_nll_over_the_prompt_is_trls_chosen_cross_entropy(tiny_llama_dir):
    """loss.nll_prompt: ORPO's NLL over prompt + response (TRL's `concatenated_labels` = the chosen ids wherever the
    attention mask is 1) == cross-entropy of one padded forward over each chosen row's every real token; the
    responses' log-probs (the odds-ratio term) are the same as without it."""
    import torch.nn.functional as F

    from preflexor import fast, losses
    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.data import collate_pairs
    from preflexor.preference import policy_logps
    from preflexor.runtime import setup_runtime

    model, tok = load_model_and_tokenizer(tiny_llama_dir, dtype="float32")
    fast.install(model)
    g = torch.Generator().manual_seed(2)
    ex = [{"prompt_ids": torch.randint(3, 1000, (p,), generator=g).tolist(),
           "chosen_ids": torch.randint(3, 1000, (c,), generator=g).tolist(),
           "rejected_ids": torch.randint(3, 1000, (r,), generator=g).tolist()}
          for p, c, r in ((9, 20, 4), (9, 7, 12), (5, 30, 6))]
    rt, spec = setup_runtime("cpu", "float32", verbose=False), losses.get_loss("orpo")
    plain, with_prompt = (policy_logps(model, collate_pairs(ex, tok.pad_id, nll_prompt=f), spec, rt)
                          for f in (False, True))
    torch.testing.assert_close(with_prompt["chosen"], plain["chosen"], rtol=0, atol=1e-5)
    torch.testing.assert_close(with_prompt["rejected"], plain["rejected"], rtol=0, atol=1e-5)
    for i, e in enumerate(ex):
        seq = torch.tensor(e["prompt_ids"] + e["chosen_ids"])
        with torch.no_grad():
            logits = model(seq[None])[0]
        want = F.cross_entropy(logits[:-1], seq[1:])  # every real token after the first
        resp = F.cross_entropy(logits[len(e["prompt_ids"]) - 1:-1], seq[len(e["prompt_ids"]):])
        torch.testing.assert_close(with_prompt["nll"][i], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(plain["nll"][i], resp, rtol=1e-4, atol=1e-4)
