"""FSDP2 (`train.fsdp=true`, preflexor/fsdp.py) on the CPU with gloo, 2 processes, through the real scripts: the loss
curve equals one process's with the doubled batch, the saved adapter is the one-process adapter and, loaded in one
process, reproduces the sharded run's held-out log-probs; a resume from a mid-run checkpoint equals the run without
the interruption; stage 2 (reference = the adapter-disabled policy, on-policy generation under `gathered`) runs."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

from tests.test_train import ENV, ROOT, adapter_tensors, run_script, tiny_args, write_pairs

pytestmark = pytest.mark.slow


def torchrun(script: str, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29900 + random.randint(0, 400)), str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def curve(out) -> list[float]:
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_fsdp_two_processes_equal_one_and_resume(tmp_path, tiny_llama_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=10)
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    common = ["train.iterations=2", "train.steps_per_iteration=2", "lora.dropout=0.0", "train.save_every=0",
              "train.eval_generations=1", "train.device=cpu", "lora.targets=[q_proj,v_proj,o_proj,lm_head]"]
    r = run_script("train_orpo.py", tiny_args(tiny_llama_dir, pairs, single, "train.batch_size=2", *common))
    assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun("train_orpo.py", tiny_args(tiny_llama_dir, pairs, sharded, "train.batch_size=1", "train.fsdp=true",
                                            *common))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FSDP2" in r.stdout
    a, b = curve(single), curve(sharded)
    assert len(a) == len(b) == 4 and a[0] != a[-1]
    for x, y in zip(a, b):  # float32 reduce-scatter of the same gradients: rounding only
        assert abs(x - y) < 1e-4, (a, b)
    sa, sb = adapter_tensors(single), adapter_tensors(sharded)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=1e-4)
    # the merged model a sharded run saved, loaded in one process: the sharded run's held-out log-probs
    ev_single, ev_sharded = (json.loads((d / "summary.json").read_text())["eval"] for d in (single, sharded))
    for k in ("eval/logps/chosen", "eval/logps/rejected"):
        assert abs(ev_single[k] - ev_sharded[k]) < 1e-3, (k, ev_single[k], ev_sharded[k])
    from preflexor.checkpoint import load_model

    m1, m2 = (load_model(d / "final" / "model") for d in (single, sharded))
    for (n, p), (_, q) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=n)

    # a kill after the first iteration's checkpoint, then the same command again: the uninterrupted run's curve
    resumed = tmp_path / "resumed"
    shutil.copytree(sharded, resumed, ignore=shutil.ignore_patterns("final", "summary.json", "step_4"))
    rows = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows if x.get("step", 0) <= 2))
    r = torchrun("train_orpo.py", tiny_args(tiny_llama_dir, pairs, resumed, "train.batch_size=1", "train.fsdp=true",
                                            *common))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert curve(resumed) == pytest.approx(b, abs=1e-6)
    sr = adapter_tensors(resumed)
    for k in sb:
        torch.testing.assert_close(sr[k], sb[k], atol=1e-6, rtol=1e-5)

    # stage 2 from the sharded stage 1: EXO with the adapter-disabled reference, on-policy samples generated gathered
    s2 = tmp_path / "stage2"
    r = torchrun("train_dpo.py", ["--config", "configs/stage2_grounded.yaml", f"model.source={sharded / 'final' / 'model'}",
                                  f"data.pairs={pairs}", "data.heldout_pairs=2", f"train.out_dir={s2}",
                                  "train.iterations=1", "train.steps_per_iteration=2", "train.batch_size=1",
                                  "train.eval_generations=1", "train.eval_max_new_tokens=4", "data.max_length=96",
                                  "lora.r=4", "lora.alpha=8", "train.device=cpu", "train.fsdp=true"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(curve(s2)) == 2 and (s2 / "final" / "adapter" / "adapter_model.safetensors").is_file()


BF16_WORKER = r'''
import sys, torch, torch.distributed as dist
from preflexor import fast, fsdp
from preflexor.lora import apply_lora, trainable_parameters
from preflexor.model import ModelArgs, Transformer
from preflexor.runtime import Runtime
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
cfg = ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
m = Transformer(cfg).to(torch.bfloat16)
apply_lora(m, 4, 8, 0.0, ["q_proj", "v_proj", "o_proj"])
fast.install(m, True)
fsdp.shard(m, Runtime(torch.device("cpu"), torch.bfloat16, None, rank, world))
opt = torch.optim.AdamW(trainable_parameters(m), lr=5e-7)
before = fsdp.full_state(m)
x = torch.randint(0, 128, (2, 16))
loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).float().reshape(-1, 128), x[:, 1:].reshape(-1))
loss.backward()
opt.step()
after = fsdp.full_state(m)
moved = [k for k in after if "lora_b" in k and not torch.equal(before[k], after[k])]
n_b = sum("lora_b" in k for k in after)
print(f"rank {rank}: dtypes {sorted(str(t.dtype) for t in set(after.values()))[:1]} moved {len(moved)}/{n_b}")
'''


def test_fsdp_keeps_fp32_adapters_over_a_bf16_base(tmp_path):
    """Over a bf16 base the adapters stay fp32 under FSDP (bf16 compute, fp32 shards): at lr 5e-7 one AdamW step
    moves every LoRA B (A's gradient is zero at step 0, B being zero)."""
    worker = tmp_path / "worker.py"
    worker.write_text(BF16_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29900 + random.randint(0, 400)), str(worker)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: dtypes ['torch.float32'] moved 6/6" in r.stdout, r.stdout
