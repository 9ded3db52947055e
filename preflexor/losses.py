"""The training objectives: preference losses (stages 1-2) and group-relative policy-gradient losses (stage 3).
Nothing else lives here.

Conventions (reference/losses.md §1, DESIGN.md):
- Inputs are float tensors of shape [B], one entry per (chosen, rejected) pair; all math is float32.
- Every loss is called as fn(chosen_logps, rejected_logps, [ref_chosen_logps, ref_rejected_logps], [chosen_nll],
  **hyperparameters); its `LossSpec` in `LOSSES` says which of the bracketed inputs it takes (`needs_ref`,
  `needs_nll`), whether the log-probs are summed or length-averaged (`average_logps`), and its hyperparameters with
  their defaults (`hparams`: the `loss.<key>` config keys). `compute` feeds any registered loss that way, for
  training and for evaluation alike.
- Metrics are detached float32 tensors of shape [B] (per example), so a training loop can average them over
  micro-batches and ranks exactly as it averages the loss. Names: rewards/{chosen,rejected,margins,accuracies},
  logps/{chosen,rejected}; ORPO adds nll, log_odds_ratio, log_odds_chosen.
- The training loss is `losses.mean()`.
Adding a loss = one function with this contract + one `LOSSES` entry (from anywhere, e.g. a test).

Policy-gradient losses (`POLICY_LOSSES`, stage 3, train_rl.py) take per-token tensors of G sampled completions per
question instead: `fn(logps, old_logps, advantages, mask, ref_logps, norm_len, **hparams)` -> (per-sequence loss [N],
metrics [N]), where the step's loss is again the mean over the step's N sequences (so micro-batches and ranks average
as above); `group_advantages` turns the rewards into advantages first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from preflexor.errors import UserError

Metrics = dict[str, torch.Tensor]

ORPO_MAX_MEAN_LOGP = -1e-6  # mean log-probs are clamped to <= this before log(1 - p): probability <= 0.999999


def _f32(*xs: torch.Tensor) -> list[torch.Tensor]:
    shape = xs[0].shape
    if len(shape) != 1 or any(x.shape != shape for x in xs):
        raise ValueError(f"preference losses take [B] tensors of one shape, got {[tuple(x.shape) for x in xs]}")
    return [x.float() for x in xs]


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0 without cancellation: log(-expm1(a)) near 0, log1p(-exp(a)) below -ln 2
    (Mächler 2012, "Accurately computing log(1 - exp(-|a|))"; TRL's ORPO uses the same split)."""
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                    rejected_logps: torch.Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, Metrics]:
    """ORPO (Hong, Lee & Thorne 2024, arXiv 2403.07691, Eqs. 6-7): L = L_SFT + beta * L_OR, no reference model.

    L_OR = -log sigmoid(log(odds(y_w) / odds(y_l))), odds(y) = P(y) / (1 - P(y)), P(y) = exp(mean token log-prob).
    In log space: log odds ratio = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l)), with a stable log1mexp.
    Mean log-probs are clamped to <= -1e-6 first, so a model that is certain of a response (a -> 0) gives a large
    finite log-odds instead of inf/NaN (TRL #1473, #2564); above the clamp the OR term passes no gradient.

    Args:
        chosen_logps, rejected_logps: [B] mean response log-probs (`sequence_logps(..., average=True)`).
        chosen_nll: [B] token-mean NLL of each chosen sequence (the SFT term, weight 1).
        beta: lambda, the odds-ratio weight (paper and TRL default 0.1).

    Worked example: P_w = 0.5, P_l = 0.2, nll = -ln 0.5, beta = 0.1. odds_w = 1, odds_l = 0.25, log odds ratio
    = ln 4 = 1.386294; L_OR = ln(1 + 1/4) = 0.223144; L = 0.693147 + 0.1 * 0.223144 = 0.715461.
    Rewards are beta * mean log-prob (not a log-ratio), as in TRL and Liger.
    """
    a_w, a_l, nll = _f32(chosen_logps, rejected_logps, chosen_nll)
    a_w_c, a_l_c = a_w.clamp(max=ORPO_MAX_MEAN_LOGP), a_l.clamp(max=ORPO_MAX_MEAN_LOGP)
    log_odds = (a_w_c - a_l_c) - (_log1mexp(a_w_c) - _log1mexp(a_l_c))
    ratio = F.logsigmoid(log_odds)
    losses = nll - beta * ratio
    metrics = _reward_metrics(beta * a_w, beta * a_l, a_w, a_l)
    metrics.update({"nll": nll.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()})
    return losses, metrics


def _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    pc, pr, rc, rr = _f32(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return pc - rc, pr - rr, pc, pr


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """DPO, sigmoid form (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) with conservative label smoothing.

    z = beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))] on summed log-probs;
    L = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)  (cDPO, Mitchell 2023, Eq. 3; eps = 0 is plain DPO).
    At z = 0 (policy == reference) L = ln 2 for any eps. Rewards are beta * log-ratio.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio, rejected_ratio, pc, pr = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      ref_chosen_logps, ref_rejected_logps)
    z = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, _reward_metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr)


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17): L = (h - 1/(2 tau))^2 with tau = beta.

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)) on MEAN log-probs (length-normalised,
    as TRL does and as the IPO authors confirmed for the paper's results). At h = 0 the loss is 1/(4 beta^2).
    """
    if beta <= 0:
        raise ValueError(f"ipo_loss: beta (tau) must be > 0, got {beta}")
    chosen_ratio, rejected_ratio, pc, pr = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      ref_chosen_logps, ref_rejected_logps)
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return losses, _reward_metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr)


def exo_pair_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                  ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
                  epsilon: float = 1e-3) -> tuple[torch.Tensor, Metrics]:
    """EXO-pref for a pair (Ji et al. 2024, arXiv 2402.00856, Eq. 16 as cited by TRL): reverse KL(p_theta || p_h).

    p_theta = softmax over {y_w, y_l} of beta * log(pi / pi_ref) = [sigmoid(z), sigmoid(-z)] (summed log-probs,
    z as in DPO); the human target is p_h = [1 - eps, eps]. So
    L = sigmoid(z) [log sigmoid(z) - log(1 - eps)] + sigmoid(-z) [log sigmoid(-z) - log eps] >= 0,
    zero exactly at z* = log((1 - eps) / eps) (6.9068 for eps = 1e-3), and log(1/2) - log(eps (1 - eps)) / 2 at z = 0.
    eps must be in (0, 1); PRefLexOR stage 2 used 5e-3, the EXO paper recommends 1e-3.
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"exo_pair_loss: epsilon must be in (0, 1) (log eps is taken), got {epsilon}")
    chosen_ratio, rejected_ratio, pc, pr = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      ref_chosen_logps, ref_rejected_logps)
    z = beta * (chosen_ratio - rejected_ratio)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-epsilon))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(epsilon)))
    return losses, _reward_metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr)


@dataclass(frozen=True)
class LossSpec:
    """How to feed a loss: which inputs it takes, mean or summed log-probs, and its hyperparameters with defaults."""

    fn: Callable[..., tuple[torch.Tensor, Metrics]]
    average_logps: bool  # sequence_logps(..., average=average_logps)
    needs_ref: bool = False  # takes the reference model's log-probs after the policy's
    needs_nll: bool = False  # takes the token-mean NLL of the chosen response (ORPO's SFT term)
    hparams: dict[str, float] = field(default_factory=dict)  # config key `loss.<k>` -> default


LOSSES: dict[str, LossSpec] = {
    "orpo": LossSpec(orpo_loss, average_logps=True, needs_nll=True, hparams={"beta": 0.1}),
    "sigmoid": LossSpec(dpo_loss, average_logps=False, needs_ref=True,
                        hparams={"beta": 0.1, "label_smoothing": 0.0}),
    "ipo": LossSpec(ipo_loss, average_logps=True, needs_ref=True, hparams={"beta": 0.1}),
    "exo_pair": LossSpec(exo_pair_loss, average_logps=False, needs_ref=True, hparams={"beta": 0.1, "epsilon": 1e-3}),
}


def get_loss(name: str, key: str = "loss_type") -> LossSpec:
    """Look up a loss by config name; an unknown name is a user error naming the config key."""
    if name not in LOSSES:
        raise UserError(f"{key}: unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def hparams(name: str, given: dict[str, float]) -> dict[str, float]:
    """The loss's hyperparameters: its declared defaults, overridden by the configured values it declares."""
    if name in POLICY_LOSSES:
        return policy_hparams(name, given)
    return {k: given.get(k, default) for k, default in get_loss(name, key="loss.name").hparams.items()}


def compute(name: str, policy: dict, ref: dict | None = None, given: dict | None = None
            ) -> tuple[torch.Tensor, Metrics]:
    """Any registered loss from per-sequence log-probs: policy {"chosen", "rejected"[, "nll"]}, ref {"chosen",
    "rejected"} when the loss needs a reference, and the configured hyperparameters `given`."""
    spec = get_loss(name, key="loss.name")
    args = [policy["chosen"], policy["rejected"]]
    if spec.needs_ref:
        if ref is None:
            raise ValueError(f"loss {name!r} needs reference log-probs")
        args += [ref["chosen"].to(args[0].device), ref["rejected"].to(args[0].device)]
    if spec.needs_nll:
        args.append(policy["nll"])
    return spec.fn(*args, **hparams(name, given or {}))


# -- group-relative policy gradient (stage 3) ------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = r_i - mean(r of i's group), divided by the group's std + eps when `scale` (GRPO, Shao et al. 2024,
    arXiv 2402.03300: outcome supervision); Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) drops the std,
    which favours questions that are too easy or too hard. `rewards` [N] holds the groups one after another
    (N = questions * group_size); std is the unbiased one and eps 1e-4, as TRL computes it.

    Worked example: rewards [1, 0, 0, 0] -> mean 0.25, std 0.5 -> A = [1.5, -0.5, -0.5, -0.5] / (1 + 2e-4).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size or group_size < 2:
        raise ValueError(f"group_advantages: [N] rewards in groups of {group_size} >= 2, got {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def _clipped_pg(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                ref_logps: torch.Tensor | None, norm_len: torch.Tensor, beta: float, eps_low: float,
                eps_high: float) -> tuple[torch.Tensor, Metrics]:
    """The per-token clipped surrogate shared by the family, summed per sequence and divided by `norm_len` [N]:
    l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * KL_t, rho_t = exp(logp_t - old_logp_t),
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (the k3 estimator, Schulman 2020; >= 0, unbiased for
    KL(pi || pi_ref) under samples of pi). With one update per sample batch old_logps = logps.detach(): rho = 1 and
    the gradient is -A * grad logp_t (+ the KL's)."""
    shapes = [tuple(t.shape) for t in (logps, old_logps, mask, advantages)]
    if logps.dim() != 2 or len(set(shapes[:3])) > 1 or shapes[3] != shapes[0][:1]:
        raise ValueError(f"policy losses take [N, T] log-probs, old log-probs, mask and [N] advantages: {shapes}")
    if not (0.0 <= eps_low < 1.0 and eps_high >= 0.0):
        raise ValueError(f"policy losses: eps_low must be in [0, 1) and eps_high >= 0, got {eps_low}, {eps_high}")
    lp, old, m = logps.float(), old_logps.float(), mask.float()
    adv = advantages.float()[:, None]  # (N, 1)
    ratio = torch.exp(lp - old)  # (N, T)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("policy losses: beta != 0 needs the reference log-probs")
        d = ref_logps.float() - lp
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + beta * kl
    losses = (per_token * m).sum(dim=1) / norm_len.float()
    n_tok = m.sum(dim=1).clamp(min=1.0)
    clip_frac = (((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))).float()
    metrics = {"advantages": adv[:, 0].detach(), "completion_tokens": m.sum(dim=1).detach(),
               "clip_fraction": ((clip_frac * m).sum(dim=1) / n_tok).detach()}
    if kl is not None:
        metrics["kl"] = ((kl * m).sum(dim=1) / n_tok).detach()
    return losses, metrics


def grpo_loss(logps, old_logps, advantages, mask, ref_logps, norm_len, beta: float = 0.0, epsilon: float = 0.2):
    """GRPO (Shao et al. 2024, arXiv 2402.03300): clipped ratio with symmetric epsilon, each sequence's token sum
    divided by its own length (`norm_len` = |o_i|), then the mean over sequences; advantages scaled by the group's
    std. beta > 0 adds the k3 KL to the reference (the paper's 0.04; TRL's default and ours: 0)."""
    return _clipped_pg(logps, old_logps, advantages, mask, ref_logps, norm_len, beta, epsilon, epsilon)


def dr_grpo_loss(logps, old_logps, advantages, mask, ref_logps, norm_len, beta: float = 0.0,
                 epsilon: float = 0.2):
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): GRPO without its length and std
    normalisation: every sequence's token sum is divided by the same constant (`norm_len` = the generation budget,
    max_new_tokens, as TRL's dr_grpo), so long wrong answers are not penalised less per token than short ones;
    advantages are not scaled by the std."""
    return _clipped_pg(logps, old_logps, advantages, mask, ref_logps, norm_len, beta, epsilon, epsilon)


def dapo_loss(logps, old_logps, advantages, mask, ref_logps, norm_len, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.28):
    """DAPO (Yu et al. 2025, arXiv 2503.14476): clip-higher (eps_low 0.2, eps_high 0.28: low-probability
    tokens may grow further, against entropy collapse) and token-level normalisation: the sum over all tokens of the
    step divided by their number, so each token weighs the same whatever its sequence's length (`norm_len` = the
    step's mean completion length, so that the mean over sequences is that token mean). Dynamic sampling and the
    overlong reward shaping are options of train_rl.py (`rl.drop_equal_groups`, `rl.reward_overlong`)."""
    return _clipped_pg(logps, old_logps, advantages, mask, ref_logps, norm_len, beta, eps_low, eps_high)


@dataclass(frozen=True)
class PolicySpec:
    """A policy-gradient loss: its function, how its `norm_len` is formed ("sequence": each completion's length |o_i|,
    "token": the step's mean length, "constant": the generation budget), whether advantages are std-scaled, and its
    hyperparameters (config keys `loss.<k>`) with defaults."""

    fn: Callable[..., tuple[torch.Tensor, Metrics]]
    norm: str
    scale_std: bool
    hparams: dict[str, float] = field(default_factory=dict)


POLICY_LOSSES: dict[str, PolicySpec] = {
    "grpo": PolicySpec(grpo_loss, norm="sequence", scale_std=True, hparams={"beta": 0.0, "epsilon": 0.2}),
    "dr_grpo": PolicySpec(dr_grpo_loss, norm="constant", scale_std=False, hparams={"beta": 0.0, "epsilon": 0.2}),
    "dapo": PolicySpec(dapo_loss, norm="token", scale_std=True,
                       hparams={"beta": 0.0, "eps_low": 0.2, "eps_high": 0.28}),
}


def get_policy_loss(name: str, key: str = "loss.name") -> PolicySpec:
    if name not in POLICY_LOSSES:
        hint = " (a preference loss: stages 1-2, train_orpo.py / train_dpo.py)" if name in LOSSES else ""
        raise UserError(f"{key}: {name!r} is not a policy-gradient loss{hint}; choose one of "
                        f"{', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name]


def norm_lengths(spec: PolicySpec, completion_lens: torch.Tensor, step_mean_len: float, budget: int) -> torch.Tensor:
    """`norm_len` [N] for a micro-batch: the divisor of each sequence's token sum under the loss's normalisation.
    `step_mean_len` is the mean completion length over the whole optimizer step (every micro-batch and rank), so
    that accumulation gives the same gradient as one big batch."""
    if spec.norm == "sequence":
        return completion_lens.float().clamp(min=1.0)
    if spec.norm == "token":
        return torch.full(completion_lens.shape, max(step_mean_len, 1.0), device=completion_lens.device)
    return torch.full(completion_lens.shape, float(budget), device=completion_lens.device)


def policy_hparams(name: str, given: dict[str, float]) -> dict[str, float]:
    return {k: given.get(k, default) for k, default in get_policy_loss(name).hparams.items()}
