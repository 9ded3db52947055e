"""Stage 3 parity with TRL: our group-relative policy-gradient losses (`preflexor.losses`: `group_advantages`,
`grpo_loss`, `dr_grpo_loss`, `dapo_loss` via `POLICY_LOSSES` / `norm_lengths`) against TRL's `GRPOTrainer`.

What is compared
- Advantages: `group_advantages(rewards, G, scale=spec.scale_std)` against TRL's formula from
  `GRPOTrainer._generate_and_score_completions` ("sum_then_normalize"), reproduced here with TRL's own
  `trl.trainer.utils.nanstd`: A = r - nanmean(group); divided by nanstd(group) (unbiased) + 1e-4 unless
  scale_rewards == "none" (TRL's Dr. GRPO recipe; our Dr. GRPO has scale_std=False). That method needs a whole
  trainer (generation, reward functions), so its advantage lines are reproduced, not called.
- Losses: TRL's real `GRPOTrainer._compute_loss`, called unbound on a stand-in `self` (`_TrainerStub`: only the
  attributes that method reads; a missing one raises AttributeError, so a TRL change that reads more fails loudly).
  Its `_get_per_token_logps_and_entropies` returns per-token log-probs we choose, as a leaf tensor that requires
  grad, so the model is never run. The same log-probs, old log-probs (different: ratios on both sides of
  [1 - eps_low, 1 + eps_high], with both signs of advantage; asserted), reference log-probs (beta in {0, 0.04}),
  ragged right-padded masks (padding positions hold ordinary finite values that must be masked out) and advantages
  (from `group_advantages` on 0/1 and fractional rewards, groups of 4 and 8) go to both sides:
    grpo    <-> TRL loss_type="grpo"    (norm_len = each row's length)
    dr_grpo <-> TRL loss_type="dr_grpo" (norm_len = the budget = TRL's max_completion_length, here 16 > T = 12)
    dapo    <-> TRL loss_type="dapo"    (norm_len = the step's mean length; TRL divides by
                                         inputs["num_items_in_batch"] = the step's total completion tokens)
  asserting our `losses.mean()` == TRL's loss and d/d(per-token logps) of both agree (torch.autograd.grad), plus
  TRL's logged kl and clip_ratio/region_mean against our token-weighted metrics. Also: the on-policy path
  (old_per_token_logps absent in TRL, `logps.detach()` for us, as train_rl.py calls it), DAPO's token-level
  property (our mean == sum(per-token loss * mask) / mask.sum(), checked against TRL's "bnpo" and an explicit
  float64 formula), and gradient accumulation over two micro-batches (TRL with current_gradient_accumulation_steps
  = steps_per_generation = 2 summed over micro-batches; ours sum(losses) / N_step with norm_len from the whole
  step, as train_rl.py accumulates).

Tolerances: our losses compute in float32 whatever the input dtype (`_clipped_pg` casts), TRL in the input's
dtype. TRL is run on float32 and on float64 copies of the same values; both are compared with ours at
rtol 1e-5, atol 2e-7 on values (losses are O(0.01-0.3), sums of terms of both signs) and rtol 1e-5, atol 1e-7
on gradients (entries are O(1e-3-1e-1), one row's A / (N * norm_len)); advantages at rtol 1e-6, atol 1e-6.
Observed worst errors (TRL in float64 vs ours): values 4.2e-8 absolute (up to 5.4e-6 relative, on the smallest
losses), gradients 1.0e-8, advantages 2.4e-7; TRL in float32 gives the same gradients bit for bit and values within
3e-8. Inputs come from fixed seeds; no model is run (the test bodies take milliseconds; importing
trl.trainer.grpo_trainer itself takes most of the module's time).
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
from trl.trainer.utils import nanstd  # noqa: E402

from preflexor.losses import POLICY_LOSSES, group_advantages, norm_lengths  # noqa: E402

GRPOTrainer = grpo_trainer.GRPOTrainer

N_Q, T, BUDGET, PROMPT_LEN = 3, 12, 16, 5
BETAS = [0.0, 0.04]
HPARAMS = {"grpo": {"epsilon": 0.2}, "dr_grpo": {"epsilon": 0.2}, "dapo": {"eps_low": 0.2, "eps_high": 0.28}}
VAL_TOL = dict(rtol=1e-5, atol=2e-7)
GRAD_TOL = dict(rtol=1e-5, atol=1e-7)


# --- the stand-in trainer ------------------------------------------------------------------------------------------

class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


class _TrainerStub:
    """Exactly the attributes `GRPOTrainer._compute_loss` reads for these loss types (token-level importance
    sampling, no entropy masking / bonus, no vLLM correction, no off-policy mask, no aux loss, one process)."""

    def __init__(self, loss_type, beta, eps_low, eps_high, per_token_logps, grad_accum=1, steps_per_generation=1):
        self.loss_type = loss_type
        self.beta = beta
        self.epsilon_low, self.epsilon_high = eps_low, eps_high
        self.importance_sampling_level = "token"
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.aux_loss_enabled = False
        self._entropy_bonus_enabled = False
        self.max_completion_length = BUDGET
        self.current_gradient_accumulation_steps = grad_accum
        self.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=steps_per_generation)
        self.accelerator = _Accelerator()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.model = SimpleNamespace(training=True)
        self._per_token_logps = per_token_logps

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        lp = self._per_token_logps
        assert logits_to_keep == lp.shape[1] and input_ids.shape == (lp.shape[0], PROMPT_LEN + lp.shape[1])
        assert compute_entropy and not compute_aux_loss
        return lp, torch.zeros_like(lp.detach()), None


def trl_loss(loss_type, logps, old_logps, advantages, mask, ref_logps, beta, eps_low, eps_high,
             num_items_in_batch=None, grad_accum=1, steps_per_generation=1):
    """TRL's loss and its gradient w.r.t. the per-token log-probs (a fresh leaf copy of `logps`), and its metrics."""
    lp = logps.detach().clone().requires_grad_(True)
    stub = _TrainerStub(loss_type, beta, eps_low, eps_high, lp, grad_accum, steps_per_generation)
    n = lp.shape[0]
    inputs = {"prompt_ids": torch.ones(n, PROMPT_LEN, dtype=torch.long),
              "prompt_mask": torch.ones(n, PROMPT_LEN, dtype=torch.long),
              "completion_ids": torch.ones(n, lp.shape[1], dtype=torch.long),
              "completion_mask": mask,
              "advantages": advantages}
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref_logps
    inputs["num_items_in_batch"] = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, stub._metrics["train"]


def ours_loss(name, logps, old_logps, advantages, mask, ref_logps, beta, step_mean_len=None, n_step=None):
    """Our step loss (`losses.mean()`, or sum / n_step for a micro-batch of an accumulated step), its gradient and
    metrics; `old_logps` None means on-policy (`logps.detach()`, as train_rl.py)."""
    spec = POLICY_LOSSES[name]
    lp = logps.detach().clone().requires_grad_(True)
    lens = mask.sum(dim=1)
    mean_len = float(lens.float().mean()) if step_mean_len is None else step_mean_len
    norm = norm_lengths(spec, lens, mean_len, BUDGET)
    old = lp.detach() if old_logps is None else old_logps
    losses, metrics = spec.fn(lp, old, advantages, mask, ref_logps, norm, beta=beta, **HPARAMS[name])
    assert losses.shape == (lp.shape[0],)
    loss = losses.mean() if n_step is None else losses.sum() / n_step
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


def _eps(name):
    h = HPARAMS[name]
    return (h["epsilon"], h["epsilon"]) if "epsilon" in h else (h["eps_low"], h["eps_high"])


# --- inputs ----------------------------------------------------------------------------------------------------------

def _rewards(kind, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    n = N_Q * group_size
    if kind == "binary":
        r = (torch.rand(n, generator=g) < 0.5).float()
        r[:group_size] = torch.tensor([1.0, 0.0] * (group_size // 2))  # a mixed group for sure
        r[group_size:2 * group_size] = 1.0  # and an all-correct one: zero std, zero advantage
        return r
    return torch.rand(n, generator=g)


def _tokens(n, seed):
    """old/new/ref per-token log-probs [n, T] (float64) and a ragged right-padded int mask."""
    g = torch.Generator().manual_seed(1000 + seed)
    old = -0.05 - 4.0 * torch.rand(n, T, generator=g, dtype=torch.float64)
    logps = old + (torch.rand(n, T, generator=g, dtype=torch.float64) - 0.5)  # ratio in [e^-0.5, e^0.5]
    ref = old + 0.3 * torch.randn(n, T, generator=g, dtype=torch.float64)
    lens = torch.randint(1, T + 1, (n,), generator=g)
    lens[0], lens[1] = T, 1  # a full row and a one-token row
    mask = (torch.arange(T)[None, :] < lens[:, None]).int()
    return logps, old, ref, mask


def _case(kind, group_size, seed, scale):
    rewards = _rewards(kind, group_size, seed)
    adv = group_advantages(rewards, group_size, scale=scale)
    logps, old, ref, mask = _tokens(rewards.numel(), seed)
    return rewards, adv, logps, old, ref, mask


def _trl_advantages(rewards, group_size, scale_rewards):
    """TRL 1.16 `_generate_and_score_completions`, multi_objective_aggregation="sum_then_normalize", one reward."""
    mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return adv


# --- advantages -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["binary", "fractional"])
@pytest.mark.parametrize("group_size", [4, 8])
@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_group_advantages_match_trl_formula(name, group_size, kind):
    scale = POLICY_LOSSES[name].scale_std
    assert scale == (name != "dr_grpo")  # TRL's Dr. GRPO recipe: scale_rewards="none"
    for seed in range(3):
        rewards = _rewards(kind, group_size, seed)
        ours = group_advantages(rewards, group_size, scale=scale)
        ref = _trl_advantages(rewards, group_size, "group" if scale else "none")
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        if kind == "binary":  # the all-correct group: exactly zero on both sides
            assert torch.equal(ours[group_size:2 * group_size], torch.zeros(group_size))
            assert torch.equal(ref[group_size:2 * group_size], torch.zeros(group_size))


# --- losses -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["binary", "fractional"])
@pytest.mark.parametrize("group_size", [4, 8])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_loss_and_gradient_match_trl_compute_loss(name, beta, group_size, kind, dtype):
    eps_low, eps_high = _eps(name)
    rewards, adv, logps, old, ref, mask = _case(kind, group_size, seed=group_size, scale=POLICY_LOSSES[name].scale_std)
    logps, old, ref = logps.to(dtype), old.to(dtype), ref.to(dtype)

    # the clipping is exercised: ratios beyond both bounds, under both signs of advantage, on real tokens
    ratio, m, a = torch.exp(logps - old), mask.bool(), adv[:, None]
    for side in (ratio > 1 + eps_high, ratio < 1 - eps_low):
        for sign in (a > 0, a < 0):
            assert (side & sign & m).any()

    t_loss, t_grad, t_metrics = trl_loss(name, logps, old, adv, mask, ref, beta, eps_low, eps_high,
                                         num_items_in_batch=mask.sum())
    o_loss, o_grad, o_metrics = ours_loss(name, logps, old, adv, mask, ref, beta)
    torch.testing.assert_close(o_loss.double(), t_loss.double(), **VAL_TOL)
    torch.testing.assert_close(o_grad.double(), t_grad.double(), **GRAD_TOL)
    assert torch.equal(o_grad[~m], torch.zeros_like(o_grad[~m])) and torch.equal(t_grad[~m], o_grad[~m])

    # TRL's logged token-weighted means equal our per-sequence metrics weighted by their token counts
    n_tok = o_metrics["completion_tokens"]
    assert torch.equal(n_tok, mask.sum(dim=1).float())
    clip = float((o_metrics["clip_fraction"] * n_tok).sum() / n_tok.sum())
    assert clip > 0
    assert t_metrics["clip_ratio/region_mean"] == [pytest.approx(clip, abs=1e-6)]
    if beta:
        kl = float((o_metrics["kl"] * n_tok).sum() / n_tok.sum())
        assert t_metrics["kl"] == [pytest.approx(kl, rel=1e-5, abs=1e-7)]
    else:
        assert "kl" not in o_metrics and "kl" not in t_metrics


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_on_policy_matches_trl_without_old_logps(name, beta):
    """One update per sample batch: TRL takes old = logps.detach() when old_per_token_logps is absent; so do we."""
    eps_low, eps_high = _eps(name)
    rewards, adv, logps, _, ref, mask = _case("fractional", 4, seed=7, scale=POLICY_LOSSES[name].scale_std)
    logps, ref = logps.float(), ref.float()
    t_loss, t_grad, _ = trl_loss(name, logps, None, adv, mask, ref, beta, eps_low, eps_high)
    o_loss, o_grad, o_metrics = ours_loss(name, logps, None, adv, mask, ref, beta)
    torch.testing.assert_close(o_loss, t_loss, **VAL_TOL)
    torch.testing.assert_close(o_grad, t_grad, **GRAD_TOL)
    assert torch.equal(o_metrics["clip_fraction"], torch.zeros(mask.shape[0]))


@pytest.mark.parametrize("beta", BETAS)
def test_dapo_is_a_token_level_mean(beta):
    """DAPO: mean over sequences of sum_t(l_t m_t) / mean_len == sum(l * m) / sum(m): TRL's "bnpo" (a micro-batch
    token mean) and an explicit float64 formula (`per_token`) say the same."""
    eps_low, eps_high = _eps("dapo")
    rewards, adv, logps, old, ref, mask = _case("binary", 8, seed=3, scale=True)
    o_loss, o_grad, _ = ours_loss("dapo", logps, old, adv, mask, ref, beta)
    b_loss, b_grad, _ = trl_loss("bnpo", logps, old, adv, mask, ref, beta, eps_low, eps_high)
    torch.testing.assert_close(o_loss.double(), b_loss, **VAL_TOL)
    torch.testing.assert_close(o_grad, b_grad, **GRAD_TOL)

    ratio = torch.exp(logps - old)
    a = adv.double()[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    d = ref - logps
    per_token = per_token + beta * (torch.exp(d) - d - 1)
    token_mean = (per_token * mask).sum() / mask.sum()
    torch.testing.assert_close(o_loss.double(), token_mean, **VAL_TOL)
    # ...and it is not the per-sequence (GRPO) mean on these ragged rows
    seq_mean = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    assert abs(float(token_mean - seq_mean)) > 1e-3


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_two_micro_batches_accumulate_like_trl(name, beta):
    """An optimizer step of 2 equal micro-batches: TRL (current_gradient_accumulation_steps = steps_per_generation
    = 2, num_items_in_batch = the whole step's tokens) summed over micro-batches, against ours as train_rl.py
    accumulates (sum(losses) / N_step, norm_len from the step's mean length); both equal the one-batch loss."""
    eps_low, eps_high = _eps(name)
    rewards, adv, logps, old, ref, mask = _case("fractional", 8, seed=11, scale=POLICY_LOSSES[name].scale_std)
    logps, old, ref = logps.float(), old.float(), ref.float()
    n = mask.shape[0]
    step_mean_len, total = float(mask.sum(1).float().mean()), mask.sum()
    halves = [slice(0, n // 2), slice(n // 2, n)]
    t_parts = [trl_loss(name, logps[s], old[s], adv[s], mask[s], ref[s], beta, eps_low, eps_high,
                        num_items_in_batch=total, grad_accum=2, steps_per_generation=2) for s in halves]
    o_parts = [ours_loss(name, logps[s], old[s], adv[s], mask[s], ref[s], beta, step_mean_len, n_step=n)
               for s in halves]
    t_loss, o_loss = sum(p[0] for p in t_parts), sum(p[0] for p in o_parts)
    t_grad, o_grad = torch.cat([p[1] for p in t_parts]), torch.cat([p[1] for p in o_parts])
    torch.testing.assert_close(o_loss, t_loss, **VAL_TOL)
    torch.testing.assert_close(o_grad, t_grad, **GRAD_TOL)
    whole, whole_grad, _ = ours_loss(name, logps, old, adv, mask, ref, beta)
    torch.testing.assert_close(o_loss, whole, **VAL_TOL)
    torch.testing.assert_close(o_grad, whole_grad, **GRAD_TOL)
