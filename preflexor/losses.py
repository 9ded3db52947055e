"""Preference losses: per-sequence log-probs in, (per-example loss [B], metrics) out. Nothing else lives here.

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
