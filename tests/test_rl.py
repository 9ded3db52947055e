"""Stage 3: the policy-gradient losses by hand, the rewards, the completion forward, and train_rl.py end to end."""
from __future__ import annotations

import math

import pytest
import torch

from preflexor.errors import UserError
from preflexor.losses import (POLICY_LOSSES, dapo_loss, get_policy_loss, group_advantages, grpo_loss, norm_lengths)


# --- advantages and losses by hand -------------------------------------------------------------------------------

def test_group_advantages_worked_example():
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]), 4)
    std = math.sqrt(((0.75 ** 2) + 3 * 0.25 ** 2) / 3)  # unbiased: 0.5
    expect = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4)
    torch.testing.assert_close(a[:4], expect, atol=1e-6, rtol=0)
    assert torch.equal(a[4:], torch.zeros(4))  # a group whose rewards agree carries no advantage
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale=False),
                               torch.tensor([0.75, -0.25, -0.25, -0.25]))  # Dr. GRPO: no std
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 4)


def _tokens(seed=0, N=4, T=6):
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(N, T, generator=g, dtype=torch.float64)
    lens = torch.tensor([6, 3, 5, 1][:N])
    mask = (torch.arange(T)[None, :] < lens[:, None]).double()
    return logps, mask, lens


def test_on_policy_value_and_gradient_are_minus_advantage_over_norm():
    """old = logp.detach(): every ratio is 1, so l_i = -A_i |o_i| / D_i and d loss / d logp_it = -A_i / (N D_i)."""
    logps, mask, lens = _tokens()
    adv = torch.tensor([1.5, -0.5, 2.0, -1.0], dtype=torch.float64)
    for name, spec in POLICY_LOSSES.items():
        lp = logps.clone().requires_grad_(True)
        norm = norm_lengths(spec, lens, step_mean_len=float(lens.float().mean()), budget=8).double()
        losses, m = spec.fn(lp, lp.detach(), adv, mask, None, norm, **{k: v for k, v in spec.hparams.items()})
        torch.testing.assert_close(losses.double(), -adv * lens / norm, atol=1e-6, rtol=0)
        (g,) = torch.autograd.grad(losses.mean(), lp)
        torch.testing.assert_close(g, (-adv / (4 * norm))[:, None] * mask, atol=1e-6, rtol=0, msg=name)
        assert float(m["clip_fraction"].sum()) == 0.0
    # the three normalisations: each completion's length, the step's mean length, the generation budget
    assert norm_lengths(POLICY_LOSSES["grpo"], lens, 3.75, 8).tolist() == [6, 3, 5, 1]
    assert norm_lengths(POLICY_LOSSES["dapo"], lens, 3.75, 8).tolist() == [3.75] * 4
    assert norm_lengths(POLICY_LOSSES["dr_grpo"], lens, 3.75, 8).tolist() == [8] * 4


def test_dapo_mean_is_the_token_mean():
    logps, mask, lens = _tokens(1)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    losses, _ = dapo_loss(logps, logps - 0.1, adv, mask, None, torch.full((4,), float(lens.float().mean())))
    ratio = torch.exp(torch.tensor(0.1))
    per_token = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.28) * adv[:, None]) * mask
    torch.testing.assert_close(losses.mean().double(), per_token.sum() / mask.sum(), atol=1e-6, rtol=0)


def test_clipping_by_hand():
    """rho = e^0.5 = 1.6487: with A > 0 the clipped 1 + eps is the min (clipped, no gradient); with A < 0 the
    unclipped rho * A is the min (gradient flows). rho = e^-0.5 = 0.6065: A < 0 clips at 1 - eps, A > 0 does not."""
    lp = torch.zeros(4, 1, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.5], [-0.5], [0.5], [0.5]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    mask, norm = torch.ones(4, 1, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    losses, m = grpo_loss(lp, old, adv, mask, None, norm, epsilon=0.2)
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    torch.testing.assert_close(losses.double(), torch.tensor([-1.2, r_hi, 0.8, -r_lo], dtype=torch.float64))
    (g,) = torch.autograd.grad(losses.sum(), lp)
    torch.testing.assert_close(g[:, 0], torch.tensor([0.0, r_hi, 0.0, -r_lo], dtype=torch.float64))
    assert m["clip_fraction"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # DAPO's clip-higher lets the A > 0 ratio grow to 1.28 before it clips
    losses, _ = dapo_loss(lp, old, adv, mask, None, norm, eps_low=0.2, eps_high=0.28)
    assert float(losses[0].detach()) == pytest.approx(-1.28)


def test_k3_kl_by_hand_and_zero_at_the_reference():
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -2.0]], dtype=torch.float64)
    mask, adv, norm = torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.full((1,), 2.0)
    losses, m = grpo_loss(lp, lp, adv, mask, ref, norm, beta=0.04)
    k3 = math.exp(-0.5) + 0.5 - 1  # e^(ref - logp) - (ref - logp) - 1 = 0.10653
    assert float(m["kl"][0]) == pytest.approx(k3 / 2)
    assert float(losses[0]) == pytest.approx(0.04 * k3 / 2)
    _, m = grpo_loss(lp, lp, adv, mask, lp.clone(), norm, beta=0.04)
    assert float(m["kl"][0]) == 0.0
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(lp, lp, adv, mask, None, norm, beta=0.04)


def test_registry_refuses_preference_losses_with_a_hint():
    assert get_policy_loss("dapo").hparams == {"beta": 0.0, "eps_low": 0.2, "eps_high": 0.28}
    with pytest.raises(UserError, match="preference loss"):
        get_policy_loss("orpo")
    with pytest.raises(UserError, match="choose one of dapo, dr_grpo, grpo"):
        get_policy_loss("ppo")


# --- rewards ---------------------------------------------------------------------------------------------------

def test_rewards_each_and_weighted():
    from preflexor import rewards
    from preflexor.thinking import THINK_END, THINK_START

    good = f"{THINK_START}\n**Reasoning Steps**:\n\n1. a is a kind of b.\n\n{THINK_END}\nYes\n"
    texts = [good, good.replace("Yes", "No"), "Yes, because", f"{THINK_START} never closed"]
    rec = {"meta": {"answer": "Yes", "question": "Is a a kind of b?"}}
    assert rewards.correctness(texts, "Yes") == [1.0, 0.0, 1.0, 0.0]
    assert rewards.thinking_format(texts) == [1.0, 1.0, 0.0, 0.0]
    assert rewards.overlong([10, 90, 96, 100], [False, False, False, True], budget=100, buffer=20) == [
        0.0, -0.5, -0.8, -1.0]

    class Checker:  # a is a kind of b holds
        def factuality(self, thinking):
            return (1, 1) if "a is a kind of b" in thinking else (0, 0)

    assert rewards.factuality(texts, Checker()) == [1.0, 1.0, 0.0, 0.0]
    total, parts = rewards.score(texts, rec, {"correct": 1.0, "format": 0.5, "factuality": 0.0}, lengths=[1] * 4,
                                 truncated=[False] * 4, budget=100, overlong_buffer=20, checker=Checker())
    assert total == [1.5, 0.5, 1.0, 0.0] and set(parts) == {"correct", "format"}  # weight 0: not computed

    class Judge:  # metrics.Judge's reply, parsed: a 1-10 accuracy or None
        def score(self, question, reference, answer):
            assert question == "Is a a kind of b?" and reference == "Yes"
            return {"accuracy": 10.0 if answer.startswith("Yes") else None}

    assert rewards.judged(texts, "Is a a kind of b?", "Yes", Judge()) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="judge"):
        rewards.score(texts, rec, {"judge": 1.0}, lengths=[1] * 4, truncated=[False] * 4, budget=100,
                      overlong_buffer=20)


# --- the completion forward --------------------------------------------------------------------------------------

def test_completion_logps_match_full_logits(tiny_llama_dir):
    """The chunked head on the completion positions only = log_softmax of the model's full logits, gathered."""
    from preflexor import fast
    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.lora import apply_lora
    from preflexor.policy import collate_completions, completion_token_logps
    from preflexor.runtime import setup_runtime

    model, tok = load_model_and_tokenizer(tiny_llama_dir)
    apply_lora(model, 4, 8)
    fast.install(model, True)
    rt = setup_runtime("cpu", "float32", verbose=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 9, 3)]
    comps = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (4, 1, 7)]
    batch = collate_completions(prompts, comps, tok.pad_id)
    got = completion_token_logps(model, batch, rt)
    with torch.no_grad():
        logits = model(batch["input_ids"]).float()
    want = torch.log_softmax(logits, -1).gather(-1, batch["targets"].clamp(min=0)[..., None])[..., 0]
    want = want * batch["completion_mask"]
    torch.testing.assert_close(got.detach(), want, atol=2e-5, rtol=0)
    for n, (p, c) in enumerate(zip(prompts, comps)):  # row n's completion sits after its prompt
        assert batch["completion_mask"][n].nonzero().flatten().tolist() == list(range(len(p) - 1, len(p) + len(c) - 1))


# --- train_rl.py -------------------------------------------------------------------------------------------------

# A random tiny model never answers right: this stand-in reward (a stable hash of the text) gives groups that differ.
HASH_REWARD = ("import hashlib, preflexor.rewards as r; "
               "r.correctness = lambda texts, gold: [float(hashlib.sha256(t.encode()).digest()[0] % 2) for t in texts]")


def rl_args(model_dir, out, *extra):
    return ["--config", "configs/stage3_grpo.yaml", f"model.source={model_dir}", f"train.out_dir={out}",
            "rl.group_size=4", "rl.questions_per_step=2", "sample.max_new_tokens=6", "train.steps_per_iteration=4",
            "train.save_every=1", "train.keep_last=5", "train.eval_answers=2", "train.eval_answer_tokens=4",
            "train.batch_size=8", "train.lr=1e-2", "lora.r=4", "lora.alpha=8", "rl.reward_format=0", *extra]


def _run_rl(args, **kw):
    import subprocess
    import sys

    from test_train import ENV, ROOT

    code = HASH_REWARD + "; import runpy, sys; sys.argv = ['train_rl.py', *sys.argv[1:]]; " \
                         "runpy.run_path('train_rl.py', run_name='__main__')"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=ENV, text=True, **kw)


def test_microbatches_give_the_full_batch_update(tmp_path, tiny_llama_dir, monkeypatch):
    """One step over 8 samples in micro-batches of 3 accumulates the gradient of one batch of 8, for each loss (the
    normalisers are the step's, not the micro-batch's): Adam's first moments after the step, (1 - beta1) * grad, agree
    (the weights themselves are no test: Adam's first step moves each by lr * sign(grad))."""
    import hashlib

    import train_rl
    from preflexor import rewards

    monkeypatch.setattr(rewards, "correctness",
                        lambda texts, gold: [float(hashlib.sha256(t.encode()).digest()[0] % 2) for t in texts])
    for loss in ("grpo", "dr_grpo", "dapo"):
        got = []
        for bs in (8, 3):
            out = tmp_path / f"{loss}_{bs}"
            train_rl.main(rl_args(tiny_llama_dir, out, f"loss.name={loss}", f"train.batch_size={bs}",
                                  "train.steps_per_iteration=1", "train.eval_answers=0", "train.max_grad_norm=0"))
            opt = torch.load(out / "checkpoints" / "step_1" / "optimizer.pt", weights_only=True)
            got.append({i: v["exp_avg"] for i, v in opt["state"].items()})
        assert got[0].keys() == got[1].keys() and len(got[0]) > 10
        scale = max(float(v.abs().max()) for v in got[0].values())
        assert scale > 0  # the groups' rewards differ: there is a gradient
        for k in got[0]:
            torch.testing.assert_close(got[1][k], got[0][k], atol=1e-5 * scale, rtol=1e-4, msg=f"{loss} {k}")


@pytest.mark.slow
def test_train_rl_end_to_end_and_sigkill_resume_bit_identical(tmp_path, tiny_llama_dir):
    import json
    import random
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    p = _run_rl(rl_args(tiny_llama_dir, ref_out, "loss.beta=0.04"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-2000:]
    assert "held-out exact accuracy: before" in stdout
    recs = [json.loads(x) for x in (ref_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for k in ("loss", "reward", "reward/correct", "accuracy", "kl", "clip_fraction", "grad_norm", "equal_groups",
              "sample_tokens_per_s", "train_tokens_per_s"):
        assert all(k in r for r in recs), k
    assert any(r["kl"] > 0 for r in recs[1:])  # the policy moved away from the adapter-disabled reference
    summary = json.loads((ref_out / "summary.json").read_text())
    assert summary["answers_before"]["n"] == summary["answers_after"]["n"] == 2
    assert (ref_out / "final" / "model" / "model.safetensors").exists()
    ref = load_file(str(ref_out / "final" / "adapter" / "adapter_model.safetensors"))

    kill_after = random.Random().randint(1, 3)
    p = _run_rl(rl_args(tiny_llama_dir, out, "loss.beta=0.04"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if any(int(c.name.split("_")[1]) >= kill_after for c in (out / "checkpoints").glob("step_*")):
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    p = _run_rl(rl_args(tiny_llama_dir, out, "loss.beta=0.04"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-2000:]
    assert "resumed from" in stdout
    got = load_file(str(out / "final" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), f"{k} differs after resume (killed after step {kill_after})"
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # no step logged twice


@pytest.mark.parametrize("extra, says", [
    (["loss.name=orpo"], "loss.name: 'orpo' is not a policy-gradient loss (a preference loss"),
    (["data.teacher=grounded"], "data.teacher: stage 3 needs checkable answers"),
    (["rl.group_size=1"], "config key 'rl.group_size' must be"),
    (["sample.temperature=0"], "sample.temperature: a group of greedy samples"),
    (["rl.reward_correct=0", "rl.reward_format=0"], "every reward weight is 0"),
    (["rl.reward_overlong=1", "rl.overlong_buffer=6"], "rl.overlong_buffer: must be below"),
    (["rl.reward_judge=1"], "rl.judge_url:"),
    (["model.source=runs/no_such_stage2/final/model"], "train stages 1-2 first"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_llama_dir, extra, says):
    import subprocess
    import sys

    from test_train import ENV, ROOT

    out = tmp_path / "out"
    args = rl_args(tiny_llama_dir, out) + extra
    r = subprocess.run([sys.executable, "train_rl.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()  # nothing written


def test_a_groups_prompt_runs_once_with_the_same_numbers(tiny_llama_dir):
    """hidden_shared_group (the prompt once, ragged answers in length blocks) = one padded forward: values and
    gradients."""
    from preflexor import fast
    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.lora import apply_lora
    from preflexor.policy import collate_completions, completion_token_logps
    from preflexor.runtime import setup_runtime

    model, tok = load_model_and_tokenizer(tiny_llama_dir)
    apply_lora(model, 4, 8)
    fast.install(model, True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.1)
    rt = setup_runtime("cpu", "float32", verbose=False)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 1000, (11,), generator=g).tolist()
    comps = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (4, 1, 7, 30, 29, 6)]
    shared = collate_completions([prompt] * 6, comps, tok.pad_id)
    assert "prompt" in shared
    plain = {k: v for k, v in shared.items() if k not in ("prompt", "completions")}
    params = [p for p in model.parameters() if p.requires_grad]
    a, b = completion_token_logps(model, shared, rt), completion_token_logps(model, plain, rt)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for x, y in zip(torch.autograd.grad(a.sum(), params), torch.autograd.grad(b.sum(), params)):
        torch.testing.assert_close(x, y, atol=1e-5 * float(y.abs().max()), rtol=1e-4)


@pytest.mark.slow
def test_torchrun_gloo_equals_one_process(tmp_path, tiny_llama_dir):
    """2 gloo processes with 1 question each per step = 1 process with 2: the same samples (seeded by question), the
    same rewards, and the same gradients (the normalisers are global): Adam's moments after 2 steps agree."""
    import json
    import random
    import subprocess
    import sys

    from test_train import ENV, ROOT

    wrapper = tmp_path / "rl_hash_reward.py"
    wrapper.write_text(HASH_REWARD.replace("; ", "\n") + f"\nimport runpy, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                       f"runpy.run_path({str(ROOT / 'train_rl.py')!r}, run_name='__main__')\n")
    common = ["train.steps_per_iteration=2", "train.eval_answers=0", "loss.name=dapo", "train.max_grad_norm=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, str(wrapper), *rl_args(tiny_llama_dir, one, *common)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + random.randint(0, 400)), str(wrapper)]
    r = subprocess.run([*torchrun, *rl_args(tiny_llama_dir, two, *common, "rl.questions_per_step=1",
                                            "train.device=cpu")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = lambda out: [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = log(one), log(two)
    assert [x["reward"] for x in a] == [x["reward"] for x in b] and [x["samples"] for x in b] == [8, 8]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (a, b)
    moments = [{i: v["exp_avg"] for i, v in torch.load(out / "checkpoints" / "step_2" / "optimizer.pt",
                                                        weights_only=True)["state"].items()} for out in (one, two)]
    scale = max(float(v.abs().max()) for v in moments[0].values())
    for k in moments[0]:
        torch.testing.assert_close(moments[1][k], moments[0][k], atol=1e-5 * scale, rtol=1e-4)
