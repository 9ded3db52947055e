"""Stage 2: the adapter-disabled reference, DPO at step 0, no extra parameter storage, and the script end to end."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from test_train import ENV, ROOT, adapter_tensors, run_script, tiny_args, write_pairs


@pytest.fixture
def setup(tiny_llama_dir, tmp_path):
    """A fresh "stage-1 model" (the tiny Llama with reasoning tokens), its tokenizer and a batch of 3 pairs."""
    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.data import collate_pairs, load_pairs, tokenize_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=6)
    model, tok = load_model_and_tokenizer(tiny_llama_dir)
    examples, _ = tokenize_pairs(tok, load_pairs(pairs), mask_mode="answer_only", max_length=96)
    return model, tok, collate_pairs(examples[:3], tok.pad_id)


def test_step0_dpo_is_ln2_and_reference_is_the_stage1_model(setup):
    from preflexor.losses import get_loss
    from preflexor.lora import apply_lora
    from preflexor.config import LossConfig
    from preflexor.preference import policy_logps, preference_loss, reference_logps
    from preflexor.runtime import setup_runtime

    stage1, tok, batch = setup
    rt = setup_runtime("cpu", "float32", verbose=False)
    spec = get_loss("sigmoid")
    stage1.eval()
    before = policy_logps(stage1, batch, spec, rt)  # the stage-1 model itself, before any adapter exists

    model = apply_lora(stage1, r=4, alpha=8, dropout=0.1)
    model.train()
    ref = reference_logps(model, batch, spec, rt)
    for k in ("chosen", "rejected"):
        assert torch.equal(ref[k], before[k]), "reference log-probs must be the stage-1 model's"
    model.eval()  # dropout off: at step 0 the policy equals the reference
    losses, m = preference_loss(model, batch, LossConfig(name="sigmoid", params={"beta": 0.1}), rt)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)), atol=1e-6, rtol=0)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert float(m[k].abs().max()) < 1e-6


def test_reference_adds_no_parameter_storage(setup):
    from preflexor.lora import apply_lora, disable_lora

    model = apply_lora(setup[0], r=4, alpha=8)

    def storages():
        return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    policy = storages()
    n_tensors = sum(t.numel() for t in model.parameters())
    with disable_lora(model):
        assert storages() == policy
        assert sum(t.numel() for t in model.parameters()) == n_tensors
    assert any("lora_a" in n for n, _ in model.named_parameters())  # the adapters are there, just disabled


@pytest.mark.slow
def test_train_dpo_script_end_to_end_resume_and_bad_input(tmp_path, tiny_llama_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "stage2"
    args = ["--config", "configs/stage2_grounded.yaml", *tiny_args(
        tiny_llama_dir, pairs, out, "loss.name=exo_pair", "loss.epsilon=0.005", "loss.mask=answer_only",
        "loss.precompute_ref=true", "lora.train_new_token_rows=false", "train.iterations=1",
        "train.eval_generations=0", "train.eval_answers=3", "train.eval_answer_tokens=4")]
    r = run_script("train_dpo.py", args)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answers_before"]["n"] == summary["answers_after"]["n"] == 3
    assert "held-out exact accuracy: before" in r.stdout
    # a stage trained from this model reads its evaluation as "before" instead of redoing it
    nxt = run_script("train_dpo.py", [*args, f"model.source={out / 'final' / 'model'}",
                                      f"train.out_dir={tmp_path / 'next'}", "train.steps_per_iteration=1"])
    assert nxt.returncode == 0, nxt.stderr[-2000:]
    assert "kept from the run that saved it" in nxt.stdout
    kept = json.loads((tmp_path / "next" / "summary.json").read_text())["answers_before"]
    assert kept == summary["answers_after"]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in recs if "eval/rewards/margins" in x]
    # policy == reference at step 0, exactly (the held-out reference runs in the evaluation's own batches): zero
    # rewards, so no pair counts as won (ties are not broken by float noise)
    assert evals[0]["step"] == 0 and evals[0]["eval/rewards/margins"] == 0.0
    assert evals[0]["eval/rewards/chosen"] == 0.0 and evals[0]["eval/rewards/accuracies"] == 0.0
    assert (out / "final" / "model" / "config.json").is_file() and adapter_tensors(out)
    # rerunning a finished run resumes from its last checkpoint and trains nothing more
    r = run_script("train_dpo.py", args)
    assert r.returncode == 0 and "resumed from" in r.stdout
    # bad input: a stage-1 loss, a missing stage-1 model
    for extra, needle in [(["loss.name=orpo"], "stage-1 loss"), (["model.source=runs/nope/final/model"], "train-stage1")]:
        r = subprocess.run([sys.executable, str(ROOT / "train_dpo.py"), *args, *extra], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_the_default_configs_run_stage_1_then_stage_2_on_the_reasoning_teacher(tmp_path, tiny_llama_dir):
    """configs/stage1_orpo.yaml then configs/stage2_exo.yaml as shipped (the reasoning teacher in the active loop, the
    model's own rejected answers, the answer evaluation before and after), at tiny sizes: stage 1 scores the base
    before and itself after; stage 2 marks its on-policy answers right or wrong, trains on the wrong ones only and
    reads stage 1's evaluation as its "before"."""
    small = [f"train.out_dir={tmp_path / 's1'}", "data.pairs_per_iteration=3", "data.heldout_pairs=1",
             "train.iterations=1", "train.steps_per_iteration=1", "train.eval_answers=3", "train.eval_answer_tokens=4",
             "sample.max_new_tokens=4", "lora.r=4", "lora.alpha=8"]
    r = run_script("train_orpo.py", ["--config", "configs/stage1_orpo.yaml", f"model.source={tiny_llama_dir}", *small])
    assert r.returncode == 0, r.stderr[-2000:]
    s1 = json.loads((tmp_path / "s1" / "summary.json").read_text())
    assert s1["answers_before"]["n"] == s1["answers_after"]["n"] == 3 and s1["answers_delta"] is not None
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["data"]["teacher"] == "reasoning"
    r = run_script("train_dpo.py", ["--config", "configs/stage2_exo.yaml", *small, f"train.out_dir={tmp_path / 's2'}",
                                    f"model.source={tmp_path / 's1' / 'final' / 'model'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kept from the run that saved it" in r.stdout
    s2 = json.loads((tmp_path / "s2" / "summary.json").read_text())
    assert s2["answers_before"] == s1["answers_after"]
    pairs = [json.loads(x) for x in (tmp_path / "s2" / "data" / "iter_000.jsonl").read_text().splitlines()]
    assert len(pairs) == 3 and all(p["meta"]["rejected_correct"] is False for p in pairs)  # a tiny random model


# -- a new loss, registered from outside the package -------------------------------------------------------------


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, gamma: float):
    """SimPO (Meng, Xia & Chen 2024, arXiv 2405.14734, Eq. 6): reference-free, length-normalised, target margin:
    L = -log sigmoid(beta * mean log pi(y_w) - beta * mean log pi(y_l) - gamma). Rewards are beta * mean log-prob.
    E.g. mean log-probs -1 and -2, beta 2, gamma 0.5: L = -log sigmoid(1.5) = 0.201413."""
    a_w, a_l = chosen_logps.float(), rejected_logps.float()
    losses = -torch.nn.functional.logsigmoid(beta * (a_w - a_l) - gamma)
    rw, rl = (beta * a_w).detach(), (beta * a_l).detach()
    return losses, {"rewards/chosen": rw, "rewards/rejected": rl, "rewards/margins": rw - rl,
                    "rewards/accuracies": (rw > rl).float(), "logps/chosen": a_w.detach(), "logps/rejected": a_l.detach()}


def test_a_loss_defined_here_trains_through_train_dpo(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """Adding a loss = one function + one `LOSSES` entry: SimPO, defined in this file, trains a few steps through the
    real train_dpo.py with `loss.name=simpo` and its own hyperparameter key `loss.gamma`; nothing else is edited."""
    import train_dpo

    from preflexor.losses import LOSSES, LossSpec

    x = torch.tensor([-1.0])
    assert float(simpo_loss(x, 2 * x, beta=2.0, gamma=0.5)[0]) == pytest.approx(0.201413, abs=1e-6)
    monkeypatch.setitem(LOSSES, "simpo", LossSpec(simpo_loss, average_logps=True, hparams={"beta": 2.0, "gamma": 0.5}))
    out = tmp_path / "simpo"
    train_dpo.main(["--config", "configs/stage2_grounded.yaml", *tiny_args(
        tiny_llama_dir, write_pairs(tmp_path / "pairs.jsonl"), out, "loss.name=simpo", "loss.gamma=0.3",
        "loss.mask=answer_only", "train.iterations=1", "train.eval_generations=0")])
    assert "loss: simpo {'beta': 0.1, 'gamma': 0.3}" in capsys.readouterr().out  # beta from the YAML
    assert json.loads((out / "config.json").read_text())["loss"]["gamma"] == 0.3
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and "step" in r and "eval/loss" not in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and "rewards/margins" in r for r in steps)
    assert any(float(t.abs().max()) > 0 for k, t in adapter_tensors(out).items() if "lora_B" in k)  # it trained
