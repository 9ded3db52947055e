"""Preference losses: hand-derived values, float64 re-implementations of TRL's formulas, and Liger end to end."""
import math

import pytest
import torch
import torch.nn.functional as F

from preflexor.errors import UserError
from preflexor.logprobs import sequence_logps, token_logps
from preflexor.losses import LOSSES, dpo_loss, exo_pair_loss, get_loss, ipo_loss, orpo_loss

IGNORE = -100
METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected"}


def _rand(B, low, high, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(B, generator=g, dtype=torch.float64)).to(dtype)


def _four(B=16, low=-60.0, high=-5.0, seed=0):
    return [_rand(B, low, high, seed + i) for i in range(4)]


# --- hand-derived values ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_equal_policy_and_reference_is_ln2(label_smoothing):
    pc, pr, _, _ = _four()
    losses, m = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, label_smoothing=label_smoothing)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)), atol=1e-6, rtol=0)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert torch.all(m[k] == 0), k


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_at_init_is_quarter_over_beta_squared(beta):
    pc, pr, _, _ = _four(low=-3.0, high=-0.1)
    losses, _ = ipo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta)
    torch.testing.assert_close(losses, torch.full_like(losses, 1 / (4 * beta ** 2)), atol=0, rtol=1e-6)


@pytest.mark.parametrize("eps", [1e-3, 5e-3])
def test_exo_minimum_at_z_star(eps):
    beta = 0.5
    z_star = math.log((1 - eps) / eps)
    zero = torch.zeros(1)
    # z = beta * (policy_chosen - 0) - 0: put the margin on the policy's chosen log-prob
    pc = torch.tensor([z_star / beta], requires_grad=True)
    loss, _ = exo_pair_loss(pc, zero, zero, zero, beta=beta, epsilon=eps)
    loss.sum().backward()
    assert abs(loss.item()) < 1e-6
    assert abs(pc.grad.item()) < 1e-6
    for dz in (-0.5, 0.5):  # strictly larger on both sides, with dL/dz = s(z) s(-z) (z - z*) of the right sign
        p = torch.tensor([(z_star + dz) / beta], requires_grad=True)
        l, _ = exo_pair_loss(p, zero, zero, zero, beta=beta, epsilon=eps)
        l.sum().backward()
        z = z_star + dz
        expected = beta * torch.sigmoid(torch.tensor(z)) * torch.sigmoid(torch.tensor(-z)) * dz
        assert l.item() > 1e-5  # 9.0e-5 at z* + 0.5 for eps = 1e-3; the minimum itself is < 1e-6
        torch.testing.assert_close(p.grad, expected.reshape(1).float(), atol=1e-7, rtol=1e-4)
    at_zero, _ = exo_pair_loss(zero, zero, zero, zero, beta=beta, epsilon=eps)
    assert at_zero.item() == pytest.approx(math.log(0.5) - 0.5 * math.log(eps * (1 - eps)), abs=1e-6)


def test_exo_value_at_zero_for_default_eps():
    zero = torch.zeros(1)
    assert exo_pair_loss(zero, zero, zero, zero, beta=0.1)[0].item() == pytest.approx(2.7612, abs=1e-4)


def test_orpo_worked_example_from_docstring():
    # P_w = 0.5, P_l = 0.2, nll = -ln 0.5, beta = 0.1 -> ln 2 + 0.1 * ln 1.25 = 0.715461
    chosen, rejected = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    losses, m = orpo_loss(chosen, rejected, -chosen, beta=0.1)
    assert losses.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.25), abs=1e-6)
    assert losses.item() == pytest.approx(0.715461, abs=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert m["log_odds_ratio"].item() == pytest.approx(-math.log(1.25), abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * math.log(0.5), abs=1e-7)


def test_orpo_stable_as_mean_logp_nears_zero():
    # naive log1p(-exp(a)) is -inf at a = 0 and loses all digits at a = -1e-7 in float32
    chosen = torch.tensor([0.0, -1e-9, -1e-7, -1e-4, -0.3], requires_grad=True)
    rejected = torch.tensor([-1e-7, -2.0, 0.0, -1e-5, -1e-6], requires_grad=True)
    losses, m = orpo_loss(chosen, rejected, torch.ones(5), beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert torch.isfinite(m["log_odds_chosen"]).all()
    # where nothing is clamped (|a| >= 1e-6) the log-odds match float64 to float32 precision
    a_w, a_l = chosen.detach().double()[3:], rejected.detach().double()[3:]
    ref = (a_w - a_l) - (torch.log(-torch.expm1(a_w)) - torch.log(-torch.expm1(a_l)))
    torch.testing.assert_close(m["log_odds_chosen"][3:].double(), ref, atol=1e-5, rtol=1e-5)


def test_argument_checks_and_registry_lookup():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="epsilon"):
        exo_pair_loss(x, x, x, x, beta=0.1, epsilon=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(x, torch.zeros(4), x, x, beta=0.1)
    with pytest.raises(UserError, match="loss_type.*exo_pair"):
        get_loss("exo")
    assert get_loss("exo_pair").fn is exo_pair_loss


def test_registry_specs_and_metric_contract():
    assert {k: (s.needs_ref, s.average_logps, s.needs_nll) for k, s in LOSSES.items()} == {
        "orpo": (False, True, True), "sigmoid": (True, False, False), "ipo": (True, True, False),
        "exo_pair": (True, False, False)}
    B = 5
    for name, spec in LOSSES.items():
        pc, pr, rc, rr = [t.requires_grad_() for t in _four(B, -3.0, -0.1, seed=7)]
        if spec.needs_ref:
            losses, m = spec.fn(pc, pr, rc, rr, beta=0.1)
        else:
            losses, m = spec.fn(pc, pr, -pc, beta=0.1)
        assert losses.shape == (B,) and losses.dtype == torch.float32 and losses.requires_grad, name
        expected = METRICS | ({"nll", "log_odds_ratio", "log_odds_chosen"} if name == "orpo" else set())
        assert set(m) == expected, name
        for k, v in m.items():
            assert v.shape == (B,) and v.dtype == torch.float32 and not v.requires_grad, (name, k)
        torch.testing.assert_close(m["rewards/margins"], m["rewards/chosen"] - m["rewards/rejected"])
        torch.testing.assert_close(m["rewards/accuracies"], (m["rewards/chosen"] > m["rewards/rejected"]).float())


def test_losses_are_float32_for_bf16_inputs():
    pc, pr, rc, rr = [t.bfloat16() for t in _four(4)]
    assert dpo_loss(pc, pr, rc, rr, beta=0.1)[0].dtype == torch.float32
    assert orpo_loss(pc / 50, pr / 50, -pc / 50, beta=0.1)[0].dtype == torch.float32


# --- float64 re-implementations of TRL's formulas (reference/losses.md §1) -----------------------------------------

def _trl_style_logratio_losses(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    """Float64, written after the structure of TRL's DPOTrainer loss branch (sigmoid, ipo, exo_pair) plus the
    cDPO form of TRL <= 0.28 / the reference DPO repo for label smoothing."""
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        z = beta * delta
        return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        eps = torch.tensor(label_smoothing, dtype=torch.float64)
        qw, log_qw = torch.sigmoid(beta * delta), F.logsigmoid(beta * delta)
        ql, log_ql = torch.sigmoid(-beta * delta), F.logsigmoid(-beta * delta)
        return qw * (log_qw - torch.log1p(-eps)) + ql * (log_ql - torch.log(eps))
    raise AssertionError(loss_type)


def _trl_orpo(a_w, a_l, nll, beta):
    """Float64 after TRL's ORPOTrainer.odds_ratio_loss: loss = nll - beta * logsigmoid(log_odds)."""
    def log1mexp(x):
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
    log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
    return nll - beta * F.logsigmoid(log_odds), log_odds


@pytest.mark.parametrize("loss_type,kwargs,low,high", [
    ("sigmoid", {}, -80.0, -5.0), ("sigmoid", {"label_smoothing": 0.2}, -80.0, -5.0),
    ("ipo", {}, -4.0, -0.05),
    ("exo_pair", {"epsilon": 1e-3}, -80.0, -5.0), ("exo_pair", {"epsilon": 5e-3}, -80.0, -5.0),
])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_logratio_losses_match_float64_trl_formula(loss_type, kwargs, low, high, beta):
    xs = [t.requires_grad_() for t in _four(64, low, high, seed=11)]
    losses, m = LOSSES[loss_type].fn(*xs, beta=beta, **kwargs)
    losses.mean().backward()
    xs64 = [t.detach().double().requires_grad_() for t in xs]
    smooth = kwargs.get("label_smoothing", kwargs.get("epsilon", 0.0))
    ref = _trl_style_logratio_losses(*xs64, beta=beta, loss_type=loss_type, label_smoothing=smooth)
    ref.mean().backward()
    torch.testing.assert_close(losses.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    for x, x64 in zip(xs, xs64):
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(m["rewards/chosen"].double(), beta * (xs64[0] - xs64[2]).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_float64_trl_formula(beta):
    a_w = _rand(64, -3.0, -1e-3, seed=21).requires_grad_()
    a_l = _rand(64, -3.0, -1e-3, seed=22).requires_grad_()
    nll = _rand(64, 0.1, 3.0, seed=23).requires_grad_()
    losses, m = orpo_loss(a_w, a_l, nll, beta=beta)
    losses.mean().backward()
    xs64 = [t.detach().double().requires_grad_() for t in (a_w, a_l, nll)]
    ref, ref_log_odds = _trl_orpo(*xs64, beta=beta)
    ref.mean().backward()
    torch.testing.assert_close(losses.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m["log_odds_chosen"].double(), ref_log_odds.detach(), atol=1e-5, rtol=1e-5)
    for x, x64 in zip((a_w, a_l, nll), xs64):
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-4)


# --- end to end against Liger-Kernel's fused linear preference losses -------------------------------------------------

def _pairs(B=3, T=11, H=31, V=123, seed=0):
    """hidden [2B, T, H] (chosen rows stacked over rejected rows), head [V, H], targets with ignored positions."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (3 / H ** 0.5)
    target = torch.randint(0, V, (2 * B, T), generator=g)
    target[torch.rand(2 * B, T, generator=g) < 0.3] = IGNORE
    target[:, 0] = IGNORE  # a prompt position
    target[:, -1] = torch.randint(0, V, (2 * B,), generator=g)  # at least one response token per row
    return hidden, weight, target


def _grads(loss, h, w):
    loss.backward()
    return h.grad, w.grad


def test_orpo_end_to_end_matches_liger():
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, target = _pairs()
    B, beta = hidden.shape[0] // 2, 0.1

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tok = token_logps(h, w, target, chunk_size=5, impl="torch")  # [2B, T]
    mask = target != IGNORE
    chosen, rejected = sequence_logps(tok, mask, average=True).chunk(2)
    # Convention difference: Liger's NLL is one global token mean over all chosen rows (sum of NLL / number of chosen
    # tokens); ours is a per-example token mean. Give each example sum_i * B / total so that the mean over pairs is
    # Liger's global mean; per-sequence means would weight short and long rows equally instead.
    chosen_nll = -(tok[:B] * mask[:B]).sum(dim=1) * B / mask[:B].sum()
    losses, m = orpo_loss(chosen, rejected, chosen_nll, beta=beta)
    ours_loss = losses.mean()
    ours_grads = _grads(ours_loss, h, w)

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    liger_loss, aux = liger.LigerFusedLinearORPOLoss(ignore_index=IGNORE, beta=beta, compiled=False)(w2, h2, target)
    liger_grads = _grads(liger_loss, h2, w2)
    (l_chosen, l_rejected, _, _, l_nll, l_rew_c, l_rew_r, l_log_odds_ratio, l_log_odds_chosen) = aux

    tol = dict(atol=1e-5, rtol=5e-4)  # Liger's fp32 tolerances for its own chunked losses
    torch.testing.assert_close(ours_loss, liger_loss, **tol)
    torch.testing.assert_close(ours_grads[0], liger_grads[0], **tol)
    torch.testing.assert_close(ours_grads[1], liger_grads[1], **tol)
    torch.testing.assert_close(m["logps/chosen"], l_chosen, **tol)
    torch.testing.assert_close(m["logps/rejected"], l_rejected, **tol)
    torch.testing.assert_close(m["nll"].mean(), l_nll, **tol)
    torch.testing.assert_close(m["rewards/chosen"], l_rew_c, **tol)
    torch.testing.assert_close(m["rewards/rejected"], l_rew_r, **tol)
    torch.testing.assert_close(m["log_odds_ratio"].mean(), l_log_odds_ratio, **tol)
    torch.testing.assert_close(m["log_odds_chosen"].mean(), l_log_odds_chosen, **tol)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("exo_pair", 1e-3)])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_dpo_end_to_end_matches_liger(loss_type, smoothing, weight_grad):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, target = _pairs(seed=1)
    ref_hidden, ref_weight, _ = _pairs(seed=2)
    beta = 0.1
    spec = LOSSES[loss_type]
    kwargs = {"epsilon": smoothing} if loss_type == "exo_pair" else {}

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
    mask = target != IGNORE
    chosen, rejected = sequence_logps(token_logps(h, w, target, chunk_size=7, impl="torch"), mask,
                                      average=spec.average_logps).chunk(2)
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_logps(token_logps(ref_hidden, ref_weight, target), mask,
                                                  average=spec.average_logps).chunk(2)
    losses, m = spec.fn(chosen, rejected, ref_chosen, ref_rejected, beta=beta, **kwargs)
    ours_loss = losses.mean()
    ours_loss.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
    liger_fn = liger.LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=beta, compiled=False, use_ref_model=True,
                                             loss_type=loss_type, label_smoothing=smoothing)
    liger_loss, aux = liger_fn(w2, h2, target, ref_input=ref_hidden, ref_weight=ref_weight)
    liger_loss.backward()
    l_chosen, l_rejected, _, _, _, l_rew_c, l_rew_r = aux

    tol = dict(atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(ours_loss, liger_loss, **tol)
    torch.testing.assert_close(h.grad, h2.grad, **tol)
    if weight_grad:
        torch.testing.assert_close(w.grad, w2.grad, **tol)
    torch.testing.assert_close(m["logps/chosen"], l_chosen, **tol)
    torch.testing.assert_close(m["logps/rejected"], l_rejected, **tol)
    torch.testing.assert_close(m["rewards/chosen"], l_rew_c, **tol)
    torch.testing.assert_close(m["rewards/rejected"], l_rew_r, **tol)
