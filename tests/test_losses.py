"""The DPO loss family against formulas written out here in plain Python math (float64), hand-checked
vectors, limits, and autograd gradchecks.

Nothing in this file builds an expectation with a helper of `dpo_ds.losses`: `_expected` below is an
independent per-pair transcription of each loss's definition.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from dpo_ds.config import LOSS_TYPES
from dpo_ds.losses import SPECS, LossParams, Objective, PairLogps, compute_loss
from dpo_ds.metrics import PairStats
from dpo_ds.parallel import Parallel

F64 = torch.float64
MEAN_LOSSES = ("ipo", "simpo", "sft", "sigmoid_norm")  # always per-token means
BATCH_LOSSES = ("aot", "aot_unpaired", "bco_pair")      # couple the pairs of a batch: tested on whole batches below
UNPAIRED_LOSSES = ("kto",)                              # on labelled single completions: tested below
REFERENCE_FREE = ("simpo", "sft")      # rewards are beta * mean log pi (no reference)


# ---------------------------------------------------------------------------- independent reference
def log_sigmoid(z: float) -> float:
    """log(1 / (1 + e^-z)), written stably for either sign of z."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid_(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def _expected(loss_type: str, pc, pr, rc, rr, nc, nr, beta, eps=0.0, gamma=0.5, alpha=0.0, length_normalize=False,
              tau=0.05):
    """(loss, chosen_reward, rejected_reward) of one pair from the published formulas."""
    nc_, nr_ = max(nc, 1), max(nr, 1)
    if loss_type in MEAN_LOSSES or length_normalize:
        a_pc, a_pr, a_rc, a_rr = pc / nc_, pr / nr_, rc / nc_, rr / nr_
    else:
        a_pc, a_pr, a_rc, a_rr = pc, pr, rc, rr
    cl, rl = a_pc - a_rc, a_pr - a_rr
    d = cl - rl
    z = beta * d
    if loss_type in ("sigmoid", "sigmoid_norm"):
        loss = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    elif loss_type == "robust":
        loss = ((1 - eps) * -log_sigmoid(z) - eps * -log_sigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        loss = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        loss = max(0.0, 1 - z)
    elif loss_type == "simpo":
        loss = -log_sigmoid(beta * (pc / nc_ - pr / nr_) - gamma)
    elif loss_type == "sft":
        loss = -pc / nc_
    elif loss_type == "exo_pair":  # EXO eq. 16: KL(softmax(beta r) || (1 - e', e')) over {chosen, rejected}
        e = eps or 1e-3
        q_w, q_l = sigmoid_(z), sigmoid_(-z)
        loss = q_w * math.log(q_w / (1 - e)) + q_l * math.log(q_l / e)
    elif loss_type == "nca_pair":
        loss = -log_sigmoid(beta * cl) - 0.5 * log_sigmoid(-beta * cl) - 0.5 * log_sigmoid(-beta * rl)
    elif loss_type == "sppo_hard":
        loss = (cl - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":
        loss = (1 - sigmoid_(beta * cl)) + sigmoid_(beta * rl)
    elif loss_type == "apo_down":
        loss = sigmoid_(beta * cl) + (1 - sigmoid_(beta * (cl - rl)))
    elif loss_type == "discopop":
        m = sigmoid_(z / tau)
        loss = (1 - m) * -log_sigmoid(z) + m * math.exp(-z)
    else:
        raise AssertionError(loss_type)
    loss += alpha * (-pc / nc_)
    if loss_type in REFERENCE_FREE:
        return loss, beta * pc / nc_, beta * pr / nr_
    return loss, beta * (a_pc - a_rc), beta * (a_pr - a_rr)


def _pairs(pc, pr, rc, rr, nc, nr, requires_grad=False) -> PairLogps:
    t = lambda v, g=False: torch.tensor(v, dtype=F64, requires_grad=g)  # noqa: E731
    return PairLogps(t(pc, requires_grad), t(pr, requires_grad), t(rc), t(rr),
                     torch.tensor(nc, dtype=torch.long), torch.tensor(nr, dtype=torch.long))


def _random_inputs(seed: int, n: int = 24):
    rng = random.Random(seed)
    nc = [rng.randint(1, 40) for _ in range(n)]
    nr = [rng.randint(1, 40) for _ in range(n)]
    pc = [-rng.uniform(0.2, 4.0) * k for k in nc]
    pr = [-rng.uniform(0.2, 4.0) * k for k in nr]
    rc = [v + rng.gauss(0, 3.0) for v in pc]
    rr = [v + rng.gauss(0, 3.0) for v in pr]
    return pc, pr, rc, rr, nc, nr


def _check_against_formula(loss_type, inputs, params: LossParams):
    pc, pr, rc, rr, nc, nr = inputs
    out = compute_loss(loss_type, _pairs(pc, pr, rc, rr, nc, nr), params)
    assert out.losses.shape == (len(pc),)
    assert out.losses.dtype == F64
    for i in range(len(pc)):
        loss, rew_c, rew_r = _expected(loss_type, pc[i], pr[i], rc[i], rr[i], nc[i], nr[i], params.beta,
                                       params.label_smoothing, params.simpo_gamma, params.rpo_alpha,
                                       params.length_normalize, params.discopop_tau)
        assert out.losses[i].item() == pytest.approx(loss, rel=1e-12, abs=1e-12), (loss_type, i)
        assert out.chosen_rewards[i].item() == pytest.approx(rew_c, rel=1e-12, abs=1e-12), (loss_type, i)
        assert out.rejected_rewards[i].item() == pytest.approx(rew_r, rel=1e-12, abs=1e-12), (loss_type, i)


# ---------------------------------------------------------------------------- the known vector
def test_known_vector_sigmoid():
    lp = _pairs([-10.0, -20.0], [-12.0, -17.0], [-11.0, -20.5], [-11.0, -17.25], [5, 7], [6, 4])
    out = compute_loss("sigmoid", lp, LossParams(beta=0.1))
    assert abs(out.losses.mean().item() - 0.639432) < 1e-6
    assert abs(out.chosen_rewards.mean().item() - 0.075) < 1e-6
    assert abs(out.rejected_rewards.mean().item() - (-0.0375)) < 1e-6
    assert abs((out.chosen_rewards - out.rejected_rewards).mean().item() - 0.1125) < 1e-6
    assert (out.chosen_rewards > out.rejected_rewards).float().mean().item() == 1.0
    # per pair, by hand: beta*d = 0.2 and 0.025
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.05], abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.025], abs=1e-12)
    assert out.losses.tolist() == pytest.approx([math.log1p(math.exp(-0.2)), math.log1p(math.exp(-0.025))], abs=1e-12)
    # and the same numbers through the logged metrics
    stats = PairStats(Parallel())
    stats.add_pairs(lp, out, real_tokens=22, padded_tokens=28)
    m = stats.reduce()
    assert abs(m["loss"] - 0.639432) < 1e-6
    assert abs(m["rewards/chosen"] - 0.075) < 1e-6
    assert abs(m["rewards/rejected"] + 0.0375) < 1e-6
    assert abs(m["rewards/margins"] - 0.1125) < 1e-6
    assert m["rewards/accuracies"] == 1.0


def test_known_vector_is_independent_of_token_counts_without_normalisation():
    a = compute_loss("sigmoid", _pairs([-10.0, -20.0], [-12.0, -17.0], [-11.0, -20.5], [-11.0, -17.25], [1, 1], [1, 1]),
                     LossParams(beta=0.1))
    b = compute_loss("sigmoid", _pairs([-10.0, -20.0], [-12.0, -17.0], [-11.0, -20.5], [-11.0, -17.25], [9, 30], [2, 17]),
                     LossParams(beta=0.1))
    assert torch.equal(a.losses, b.losses)


# ---------------------------------------------------------------------------- every loss vs its formula
CASES = [
    ("sigmoid", dict()),
    ("sigmoid", dict(label_smoothing=0.1)),           # conservative DPO
    ("sigmoid", dict(label_smoothing=0.3, length_normalize=True)),
    ("sigmoid", dict(length_normalize=True)),
    ("robust", dict(label_smoothing=0.2)),
    ("robust", dict(label_smoothing=0.45)),
    ("robust", dict(label_smoothing=0.1, length_normalize=True)),
    ("ipo", dict()),
    ("ipo", dict(beta=0.5)),
    ("hinge", dict()),
    ("hinge", dict(length_normalize=True, beta=2.0)),
    ("simpo", dict(beta=2.0, simpo_gamma=0.5)),
    ("simpo", dict(beta=2.5, simpo_gamma=1.4)),
    ("sft", dict()),
    ("sigmoid_norm", dict()),
    ("sigmoid_norm", dict(beta=2.0)),
    ("exo_pair", dict()),                              # epsilon 1e-3 when label_smoothing is 0
    ("exo_pair", dict(beta=0.5, label_smoothing=0.2)),
    ("nca_pair", dict()),
    ("nca_pair", dict(beta=0.5, length_normalize=True)),
    ("sppo_hard", dict()),
    ("sppo_hard", dict(beta=2.0)),
    ("apo_zero", dict()),
    ("apo_zero", dict(beta=0.5)),
    ("apo_down", dict()),
    ("apo_down", dict(beta=0.5)),
    ("discopop", dict()),
    ("discopop", dict(beta=0.5, discopop_tau=0.3)),
]


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.7])
@pytest.mark.parametrize("loss_type,kwargs", CASES, ids=[f"{t}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for t, kw in CASES])
def test_loss_matches_formula(loss_type, kwargs, rpo_alpha):
    params = LossParams(**{"beta": 0.1, **kwargs, "rpo_alpha": rpo_alpha})
    for seed in range(3):
        _check_against_formula(loss_type, _random_inputs(seed), params)


def test_every_loss_type_covered_by_cases():
    assert {t for t, _ in CASES} | set(BATCH_LOSSES) | set(UNPAIRED_LOSSES) == set(LOSS_TYPES)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in UNPAIRED_LOSSES])
def test_rewards_are_detached_and_losses_carry_grad(loss_type):
    pc, pr, rc, rr, nc, nr = _random_inputs(5, n=4)
    out = compute_loss(loss_type, _pairs(pc, pr, rc, rr, nc, nr, requires_grad=True), LossParams(beta=0.1))
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_rpo_term_is_alpha_times_mean_nll_of_chosen():
    pc, pr, rc, rr, nc, nr = _random_inputs(11)
    for loss_type in (t for t in LOSS_TYPES if t not in UNPAIRED_LOSSES):  # config refuses rpo_alpha with those
        for ln in ((False, True) if loss_type in ("sigmoid", "robust", "hinge") else (False,)):
            base = compute_loss(loss_type, _pairs(pc, pr, rc, rr, nc, nr), LossParams(beta=0.1, length_normalize=ln))
            rpo = compute_loss(loss_type, _pairs(pc, pr, rc, rr, nc, nr), LossParams(beta=0.1, rpo_alpha=0.25, length_normalize=ln))
            extra = [0.25 * (-pc[i] / nc[i]) for i in range(len(pc))]
            assert (rpo.losses - base.losses).tolist() == pytest.approx(extra, rel=1e-12, abs=1e-12)
            assert torch.equal(rpo.chosen_rewards, base.chosen_rewards)  # RPO changes the loss only


def test_reference_free_inputs_zero_reference():
    """Reference-free DPO feeds zeros for the reference: the margin is then pc - pr."""
    pc, pr, _, _, nc, nr = _random_inputs(3, n=8)
    zeros = [0.0] * len(pc)
    out = compute_loss("sigmoid", _pairs(pc, pr, zeros, zeros, nc, nr), LossParams(beta=0.1))
    assert out.losses.tolist() == pytest.approx([-log_sigmoid(0.1 * (a - b)) for a, b in zip(pc, pr)], rel=1e-12)


# ---------------------------------------------------------------------------- limits
def test_zero_smoothing_reduces_conservative_and_robust_to_sigmoid():
    pc, pr, rc, rr, nc, nr = _random_inputs(7)
    plain = compute_loss("sigmoid", _pairs(pc, pr, rc, rr, nc, nr), LossParams(beta=0.1))
    cdpo = compute_loss("sigmoid", _pairs(pc, pr, rc, rr, nc, nr), LossParams(beta=0.1, label_smoothing=0.0))
    rdpo = compute_loss("robust", _pairs(pc, pr, rc, rr, nc, nr), LossParams(beta=0.1, label_smoothing=0.0))
    assert torch.allclose(cdpo.losses, plain.losses, rtol=0, atol=1e-14)
    assert torch.allclose(rdpo.losses, plain.losses, rtol=0, atol=1e-14)
    # and the epsilon -> 0 limit is continuous
    small = compute_loss("robust", _pairs(pc, pr, rc, rr, nc, nr), LossParams(beta=0.1, label_smoothing=1e-9))
    assert torch.allclose(small.losses, plain.losses, rtol=1e-7, atol=1e-7)


def test_conservative_dpo_loss_is_minimised_at_the_smoothed_target():
    """-(1-e) log s(z) - e log s(-z) is minimal where s(z) = 1 - e, i.e. z = log((1-e)/e)."""
    eps = 0.2
    z_star = math.log((1 - eps) / eps)
    beta, n = 0.5, 1
    d = torch.tensor([z_star / beta], dtype=F64, requires_grad=True)
    lp = PairLogps(d, torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64),
                   torch.tensor([n]), torch.tensor([n]))
    out = compute_loss("sigmoid", lp, LossParams(beta=beta, label_smoothing=eps))
    (grad,) = torch.autograd.grad(out.losses.sum(), d)
    assert abs(grad.item()) < 1e-12


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_minimum_at_half_inverse_beta(beta):
    """IPO loss as a function of the mean-log-prob margin: 0 with zero slope at 1/(2 beta), larger either side."""
    nc, nr = 7, 3

    def at(margin: float, requires_grad=False):
        # d_bar = pc/nc - pr/nr with the reference at 0: put the whole margin on the chosen side
        pc = torch.tensor([margin * nc], dtype=F64, requires_grad=requires_grad)
        lp = PairLogps(pc, torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64),
                       torch.tensor([nc]), torch.tensor([nr]))
        return pc, compute_loss("ipo", lp, LossParams(beta=beta)).losses

    target = 1 / (2 * beta)
    pc, loss = at(target, requires_grad=True)
    assert abs(loss.item()) < 1e-12
    (grad,) = torch.autograd.grad(loss.sum(), pc)
    assert abs(grad.item()) < 1e-12
    for delta in (1e-3, 0.1, 1.0):
        assert at(target - delta)[1].item() > 0
        assert at(target + delta)[1].item() > 0
        assert at(target - delta)[1].item() == pytest.approx(delta ** 2, rel=1e-9)
        assert at(target + delta)[1].item() == pytest.approx(delta ** 2, rel=1e-9)
    # the same with a non-zero reference: solve pr so that pc/nc - rc/nc - pr/nr + rr/nr = 1/(2 beta)
    pc_, rc_, rr_ = -3.0 * nc, -2.0 * nc, -0.75 * nr
    pr_ = nr * (pc_ / nc - rc_ / nc + rr_ / nr - target)
    lp = _pairs([pc_], [pr_], [rc_], [rr_], [nc], [nr])
    assert abs(compute_loss("ipo", lp, LossParams(beta=beta)).losses.item()) < 1e-12


def test_hinge_zero_beyond_margin_one():
    beta = 0.1
    margins = [10.0, 15.0, 100.0, 5.0, 0.0, -10.0]  # beta*d = 1, 1.5, 10, 0.5, 0, -1
    lp = _pairs(margins, [0.0] * 6, [0.0] * 6, [0.0] * 6, [3] * 6, [4] * 6)
    out = compute_loss("hinge", lp, LossParams(beta=beta))
    assert out.losses.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 2.0], abs=1e-12)


@pytest.mark.parametrize("z", [1000.0, -1000.0, 1e5, -1e5])
def test_extreme_margin_is_finite_with_the_right_asymptote(z):
    beta = 0.1
    lp = _pairs([z / beta], [0.0], [0.0], [0.0], [10], [10], requires_grad=True)
    out = compute_loss("sigmoid", lp, LossParams(beta=beta))
    assert torch.isfinite(out.losses).all()
    # -log sigma(z) -> 0 for z -> +inf, -> -z for z -> -inf
    assert out.losses.item() == pytest.approx(max(-z, 0.0), abs=1e-9)
    (g,) = torch.autograd.grad(out.losses.sum(), lp.policy_chosen)
    assert torch.isfinite(g).all()
    assert g.item() == pytest.approx(-beta if z < 0 else 0.0, abs=1e-12)
    # smoothed / robust variants: -(1-e) log s(z) - e log s(-z) -> e*z for z -> +inf
    eps = 0.1
    cdpo = compute_loss("sigmoid", lp, LossParams(beta=beta, label_smoothing=eps)).losses.item()
    assert math.isfinite(cdpo)
    assert cdpo == pytest.approx(eps * z if z > 0 else -(1 - eps) * z, rel=1e-9)
    rob = compute_loss("robust", lp, LossParams(beta=beta, label_smoothing=eps)).losses.item()
    assert math.isfinite(rob)
    assert rob == pytest.approx((-eps * z if z > 0 else -(1 - eps) * z) / (1 - 2 * eps), rel=1e-9)
    # simpo: same stable log-sigmoid of beta * mean-logp margin - gamma (pc/nc = z/beta/10)
    simpo = compute_loss("simpo", lp, LossParams(beta=10 * beta, simpo_gamma=0.5)).losses.item()
    assert math.isfinite(simpo)
    assert simpo == pytest.approx(max(-(z - 0.5), 0.0), abs=1e-9)


def test_extreme_margin_in_float32_stays_finite():
    lp = PairLogps(torch.tensor([1e4, -1e4]), torch.zeros(2), torch.zeros(2), torch.zeros(2),
                   torch.tensor([1, 1]), torch.tensor([1, 1]))
    out = compute_loss("sigmoid", lp, LossParams(beta=1.0))
    assert torch.isfinite(out.losses).all()
    assert out.losses.tolist() == pytest.approx([0.0, 1e4])


# ---------------------------------------------------------------------------- gradients
# Inputs chosen so that beta*d (beta=0.1) is -0.6, 0.35 and 2.4, away from hinge's kink at 1.
_GRAD_INPUTS = dict(pc=[-20.0, -31.0, -8.0], pr=[-17.0, -40.0, -33.0], rc=[-21.0, -30.0, -9.0],
                    rr=[-24.0, -42.5, -10.0], nc=[4, 9, 5], nr=[6, 11, 2])
_GRAD_CASES = [
    ("sigmoid", dict()), ("sigmoid", dict(label_smoothing=0.15, length_normalize=True)),
    ("robust", dict(label_smoothing=0.2)), ("ipo", dict()), ("hinge", dict()), ("simpo", dict(beta=2.0)),
    ("sft", dict()), ("sigmoid", dict(rpo_alpha=0.5)), ("ipo", dict(rpo_alpha=1.0)), ("simpo", dict(rpo_alpha=0.3)),
]


@pytest.mark.parametrize("loss_type,kwargs", _GRAD_CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(_GRAD_CASES)])
def test_gradcheck(loss_type, kwargs):
    g = _GRAD_INPUTS
    # sanity: the hinge inputs really are away from the kink
    if loss_type == "hinge":
        for i in range(3):
            d = (g["pc"][i] - g["rc"][i]) - (g["pr"][i] - g["rr"][i])
            assert abs(0.1 * d - 1) > 0.1
    rc, rr = torch.tensor(g["rc"], dtype=F64), torch.tensor(g["rr"], dtype=F64)
    nc, nr = torch.tensor(g["nc"]), torch.tensor(g["nr"])
    params = LossParams(**{"beta": 0.1, **kwargs})

    def f(pc, pr):
        return compute_loss(loss_type, PairLogps(pc, pr, rc, rr, nc, nr), params).losses

    pc = torch.tensor(g["pc"], dtype=F64, requires_grad=True)
    pr = torch.tensor(g["pr"], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (pc, pr), eps=1e-6, atol=1e-8)
    if loss_type != "hinge":  # piecewise linear: no second derivative to check
        assert torch.autograd.gradgradcheck(f, (pc, pr), eps=1e-6, atol=1e-7)


def test_sigmoid_gradient_matches_closed_form():
    """d/dpc [-log s(beta d)] = -beta s(-beta d); d/dpr = +beta s(-beta d)."""
    pc, pr, rc, rr, nc, nr = _random_inputs(21, n=10)
    lp = _pairs(pc, pr, rc, rr, nc, nr, requires_grad=True)
    out = compute_loss("sigmoid", lp, LossParams(beta=0.1))
    gc, gr = torch.autograd.grad(out.losses.sum(), (lp.policy_chosen, lp.policy_rejected))
    for i in range(len(pc)):
        z = 0.1 * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        s = 1 / (1 + math.exp(z))  # sigma(-z)
        assert gc[i].item() == pytest.approx(-0.1 * s, rel=1e-12)
        assert gr[i].item() == pytest.approx(0.1 * s, rel=1e-12)


def test_sft_gradient_ignores_rejected():
    pc, pr, rc, rr, nc, nr = _random_inputs(2, n=5)
    lp = _pairs(pc, pr, rc, rr, nc, nr, requires_grad=True)
    out = compute_loss("sft", lp, LossParams(beta=0.1))
    gc, gr = torch.autograd.grad(out.losses.sum(), (lp.policy_chosen, lp.policy_rejected), allow_unused=True)
    assert gr is None or torch.count_nonzero(gr) == 0
    assert gc.tolist() == pytest.approx([-1 / n for n in nc], rel=1e-12)


# ---------------------------------------------------------------------------- gradients against the formula
@pytest.mark.parametrize("loss_type,kwargs", [("exo_pair", dict(label_smoothing=0.1)), ("nca_pair", dict(beta=0.5)),
                                              ("sppo_hard", dict()), ("apo_zero", dict(beta=0.5)),
                                              ("apo_down", dict()), ("discopop", dict(discopop_tau=0.3)),
                                              ("sigmoid_norm", dict(beta=0.5))])
def test_gradient_matches_the_formulas_derivative(loss_type, kwargs):
    """Autograd's d loss / d pc and d pr against central differences of `_expected` (plain float64 math)."""
    params = LossParams(**{"beta": 0.1, **kwargs})
    g = _GRAD_INPUTS
    lp = _pairs(g["pc"], g["pr"], g["rc"], g["rr"], g["nc"], g["nr"], requires_grad=True)
    grad_c, grad_r = torch.autograd.grad(compute_loss(loss_type, lp, params).losses.sum(),
                                         (lp.policy_chosen, lp.policy_rejected))

    def formula(i, pc, pr):
        return _expected(loss_type, pc, pr, g["rc"][i], g["rr"][i], g["nc"][i], g["nr"][i], params.beta,
                         params.label_smoothing, tau=params.discopop_tau)[0]

    h = 1e-5
    for i in range(3):
        pc, pr = g["pc"][i], g["pr"][i]
        want_c = (formula(i, pc + h, pr) - formula(i, pc - h, pr)) / (2 * h)
        want_r = (formula(i, pc, pr + h) - formula(i, pc, pr - h)) / (2 * h)
        assert abs(want_c) + abs(want_r) > 1e-4  # the point says something about the gradient
        assert grad_c[i].item() == pytest.approx(want_c, rel=1e-6, abs=1e-9), (loss_type, i)
        assert grad_r[i].item() == pytest.approx(want_r, rel=1e-6, abs=1e-9), (loss_type, i)


# ---------------------------------------------------------------------------- batch-level and stateful losses
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_aot_sorts_the_batch(beta, eps):
    """AOT: Delta_k = k-th smallest (pc - pr) - k-th smallest (rc - rr); aot_unpaired: k-th smallest chosen
    log-ratio - k-th smallest rejected log-ratio; both through the smoothed sigmoid."""
    pc, pr, rc, rr, nc, nr = _random_inputs(4, n=9)
    params = LossParams(beta=beta, label_smoothing=eps)

    def smoothed(delta):
        return -(1 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta)

    policy = sorted(a - b for a, b in zip(pc, pr))
    reference = sorted(a - b for a, b in zip(rc, rr))
    got = compute_loss("aot", _pairs(pc, pr, rc, rr, nc, nr), params).losses.tolist()
    assert got == pytest.approx([smoothed(p - r) for p, r in zip(policy, reference)], rel=1e-12)
    chosen = sorted(a - b for a, b in zip(pc, rc))
    rejected = sorted(a - b for a, b in zip(pr, rr))
    got = compute_loss("aot_unpaired", _pairs(pc, pr, rc, rr, nc, nr), params).losses.tolist()
    assert got == pytest.approx([smoothed(c - r) for c, r in zip(chosen, rejected)], rel=1e-12)
    # the older TRL name is the same loss
    assert Objective("aot_unpaired", params).specs == [SPECS["aot_unpaired"]]
    assert "aot_pair" in SPECS["aot_unpaired"].aliases


def _bco_expected(batch, beta, delta):
    pc, pr, rc, rr = batch[:4]
    return [-log_sigmoid(beta * (a - b) - delta) - log_sigmoid(-(beta * (c - e) - delta))
            for a, b, c, e in zip(pc, rc, pr, rr)]


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_bco_pair_offset_is_the_running_mean_over_steps_and_ranks(beta):
    """delta = mean of every reward (beta * log-ratio of each chosen and rejected completion) of every training
    micro-step so far, this one and the other ranks' included; evaluation reads it without moving it."""
    steps = [_random_inputs(seed, n=4) for seed in (1, 2, 3)]
    other_rank = [(7.5, 3.0), (-2.0, 5.0), (0.25, 2.0)]  # (reward sum, count) the other rank adds each micro-step
    objective = Objective("bco_pair", LossParams(beta=beta))
    seen_sum, seen_count = 0.0, 0.0
    for batch, (other_sum, other_count) in zip(steps, other_rank):
        pc, pr, rc, rr, nc, nr = batch
        rewards = [beta * (a - b) for a, b in zip(pc, rc)] + [beta * (a - b) for a, b in zip(pr, rr)]
        seen_sum, seen_count = seen_sum + sum(rewards) + other_sum, seen_count + len(rewards) + other_count
        reduce = lambda t, o=(other_sum, other_count): t + torch.tensor(o, dtype=F64)  # noqa: E731
        out = objective(_pairs(*batch), train=True, reduce=reduce)
        assert out.losses.tolist() == pytest.approx(_bco_expected(batch, beta, seen_sum / seen_count), rel=1e-12)
        assert objective.metrics() == {"bco_pair/running_mean": pytest.approx(seen_sum / seen_count, rel=1e-12)}
    held_out = _random_inputs(9, n=3)
    out = objective(_pairs(*held_out), train=False)
    assert out.losses.tolist() == pytest.approx(_bco_expected(held_out, beta, seen_sum / seen_count), rel=1e-12)
    assert objective.state_dict() == {"bco_pair": {"sum": pytest.approx(seen_sum, rel=1e-12), "count": seen_count}}


def test_bco_pair_state_survives_a_save_and_load():
    """A run stopped after two micro-steps and resumed from its state equals the uninterrupted run."""
    batches = [_random_inputs(seed, n=5) for seed in range(4)]
    uninterrupted = Objective("bco_pair", LossParams(beta=0.3))
    expected = [uninterrupted(_pairs(*b)).losses for b in batches]
    first = Objective("bco_pair", LossParams(beta=0.3))
    for b in batches[:2]:
        first(_pairs(*b))
    saved = json.loads(json.dumps(first.state_dict()))  # as trainer_state.json holds it
    resumed = Objective("bco_pair", LossParams(beta=0.3))
    resumed.load_state_dict(saved)
    for b, want in zip(batches[2:], expected[2:]):
        assert torch.equal(resumed(_pairs(*b)).losses, want)


# ---------------------------------------------------------------------------- weighted lists (MPO)
def test_weighted_list_is_the_weighted_sum_of_its_losses():
    """MPO: 0.8 sigmoid + 0.2 bco_pair + 1.0 sft, each component reported on its own; rewards are sigmoid's."""
    pc, pr, rc, rr, nc, nr = _random_inputs(6, n=6)
    beta = 0.2
    objective = Objective("sigmoid,bco_pair,sft", LossParams(beta=beta, rpo_alpha=0.5), "0.8,0.2,1.0")
    out = objective(_pairs(pc, pr, rc, rr, nc, nr))
    rewards = [beta * (a - b) for a, b in zip(pc, rc)] + [beta * (a - b) for a, b in zip(pr, rr)]
    bco = _bco_expected((pc, pr, rc, rr), beta, sum(rewards) / len(rewards))
    for i in range(6):
        sig = _expected("sigmoid", pc[i], pr[i], rc[i], rr[i], nc[i], nr[i], beta)[0]
        sft = -pc[i] / nc[i]
        assert out.losses[i].item() == pytest.approx(0.8 * sig + 0.2 * bco[i] + sft + 0.5 * sft, rel=1e-12)
        assert out.components["sigmoid"][i].item() == pytest.approx(sig, rel=1e-12)
        assert out.components["bco_pair"][i].item() == pytest.approx(bco[i], rel=1e-12)
        assert out.components["sft"][i].item() == pytest.approx(sft, rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (pc[i] - rc[i]), rel=1e-12)
    assert objective.logged_components == ("sigmoid", "bco_pair", "sft")
    stats = PairStats(Parallel(), components=objective.logged_components)
    stats.add_pairs(_pairs(pc, pr, rc, rr, nc, nr), out, 0, 0)
    m = stats.reduce()
    assert m["loss/bco_pair"] == pytest.approx(sum(bco) / 6, rel=1e-12)
    assert m["loss"] == pytest.approx(out.losses.mean().item(), rel=1e-12)


def test_one_loss_logs_no_components():
    out = compute_loss("sigmoid", _pairs(*_random_inputs(0, n=2)), LossParams())
    assert out.components == {}
    assert "loss/sigmoid" not in PairStats(Parallel()).reduce()


# ---------------------------------------------------------------------------- registry
def test_registry_covers_every_config_loss_type():
    assert tuple(SPECS) == LOSS_TYPES
    for name, spec in SPECS.items():
        assert spec.name == name and callable(spec.fn) and spec.unit == ("unpaired" if name == "kto" else "pair")
    assert [n for n, s in SPECS.items() if not s.reference] == ["simpo", "sft"]
    assert [n for n, s in SPECS.items() if s.state is not None] == ["bco_pair"]
    assert [n for n, s in SPECS.items() if s.batch_level] == ["aot", "aot_unpaired"]


def test_unknown_loss_type_is_rejected():
    pc, pr, rc, rr, nc, nr = _random_inputs(0, n=2)
    with pytest.raises(KeyError):
        compute_loss("nope", _pairs(pc, pr, rc, rr, nc, nr), LossParams(beta=0.1))


def test_training_docs_hold_the_table_of_the_specs():
    from pathlib import Path

    from dpo_ds.losses import markdown_table

    docs = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    assert markdown_table() in docs, "docs/training.md's loss table is out of date: paste dpo_ds.losses.markdown_table()"
    for name in LOSS_TYPES:
        assert f"| `{name}` |" in docs


# ---------------------------------------------------------------------------- WPO weighting
@pytest.mark.parametrize("loss_type,rpo_alpha", [("sigmoid", 0.0), ("ipo", 0.5), ("hinge", 0.0)])
def test_wpo_weighting_scales_each_pair_by_its_clamped_probability_weight(loss_type, rpo_alpha):
    """use_weighting (WPO, TRL): loss_i x min(1, exp(wc_i / nc_i + wr_i / nr_i)), the RPO term included; the
    weights carry no gradient, so d loss / d pc is the weight times the unweighted gradient."""
    pc, pr, rc, rr, nc, nr = _random_inputs(31, n=8)
    rng = random.Random(5)
    # wpo sums ~ per-token terms in (-1.5, 1.5): some pairs' weights clamp at 1, others are small
    wc = [rng.uniform(-1.5, 1.5) * n for n in nc]
    wr = [rng.uniform(-1.5, 1.5) * n for n in nr]
    lp = _pairs(pc, pr, rc, rr, nc, nr, requires_grad=True)
    lp.wpo_chosen, lp.wpo_rejected = torch.tensor(wc, dtype=F64), torch.tensor(wr, dtype=F64)
    params = LossParams(beta=0.3, rpo_alpha=rpo_alpha, use_weighting=True)
    out = Objective(loss_type, params)(lp)
    (gc,) = torch.autograd.grad(out.losses.sum(), lp.policy_chosen)
    weights = [min(1.0, math.exp(wc[i] / nc[i] + wr[i] / nr[i])) for i in range(len(pc))]
    assert min(weights) < 0.5 and max(weights) == 1.0
    h = 1e-6
    for i in range(len(pc)):
        loss, _, _ = _expected(loss_type, pc[i], pr[i], rc[i], rr[i], nc[i], nr[i], 0.3, alpha=rpo_alpha)
        assert out.losses[i].item() == pytest.approx(weights[i] * loss, rel=1e-12, abs=1e-12)
        up, _, _ = _expected(loss_type, pc[i] + h, pr[i], rc[i], rr[i], nc[i], nr[i], 0.3, alpha=rpo_alpha)
        down, _, _ = _expected(loss_type, pc[i] - h, pr[i], rc[i], rr[i], nc[i], nr[i], 0.3, alpha=rpo_alpha)
        assert gc[i].item() == pytest.approx(weights[i] * (up - down) / (2 * h), rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------------------- KTO
def _kto_inputs(seed: int, n: int):
    rng = random.Random(seed)
    tokens = [rng.randint(1, 30) for _ in range(n)]
    kl_tokens = [rng.randint(1, 30) for _ in range(n)]
    policy = [-rng.uniform(0.5, 3.0) * k for k in tokens]
    reference = [v + rng.gauss(0, 2.0) for v in policy]
    kl_policy = [-rng.uniform(0.5, 3.0) * k for k in kl_tokens]
    kl_reference = [v + rng.gauss(0.5, 2.0) for v in kl_policy]
    labels = [rng.random() < 0.6 for _ in range(n)]
    return policy, reference, tokens, kl_policy, kl_reference, kl_tokens, labels


def _unpaired(policy, reference, tokens, kl_policy, kl_reference, kl_tokens, labels, requires_grad=False):
    from dpo_ds.losses import UnpairedLogps

    t = lambda v, g=False: torch.tensor(v, dtype=F64, requires_grad=g)  # noqa: E731
    return UnpairedLogps(t(policy, requires_grad), t(reference), torch.tensor(tokens), t(kl_policy, requires_grad),
                         t(kl_reference), torch.tensor(kl_tokens), torch.tensor(labels))


def _kto_expected(rank_inputs, beta, lambda_d, lambda_u, means=False):
    """Per-example KTO losses of every rank (KTO paper eq. 7, TRL's KTOTrainer): z0 = max(0, mean over every
    rank's mismatched completions of log pi - log pi_ref); desirable lambda_D (1 - s(beta (r - z0))),
    undesirable lambda_U (1 - s(beta (z0 - r))), r = log pi - log pi_ref of the example."""
    scale = (lambda v, k: v / k) if means else (lambda v, k: v)
    mismatched = [scale(kp - kr, k) for inputs in rank_inputs for kp, kr, k in zip(inputs[3], inputs[4], inputs[5])]
    z0 = max(0.0, sum(mismatched) / len(mismatched))
    out = []
    for policy, reference, tokens, _, _, _, labels in rank_inputs:
        r = [scale(p - q, k) for p, q, k in zip(policy, reference, tokens)]
        out.append([lambda_d * (1 - sigmoid_(beta * (x - z0))) if label else lambda_u * (1 - sigmoid_(beta * (z0 - x)))
                    for x, label in zip(r, labels)])
    return out, z0


def _two_rank_reduce(other: torch.Tensor):
    """The sum over two ranks as this rank sees it: its own tensor plus the other rank's (given)."""
    return lambda mine: mine + other


@pytest.mark.parametrize("beta,lambda_d,lambda_u,means", [(0.1, 1.0, 1.0, False), (0.5, 1.33, 0.7, False),
                                                          (2.0, 1.0, 1.5, True)])
def test_kto_matches_its_formula_with_the_reference_point_over_ranks(beta, lambda_d, lambda_u, means):
    from dpo_ds.losses.menu import kto

    ranks = [_kto_inputs(seed, n=6) for seed in (3, 4)]
    want, z0 = _kto_expected(ranks, beta, lambda_d, lambda_u, means)
    assert z0 > 0
    params = LossParams(beta=beta, desirable_weight=lambda_d, undesirable_weight=lambda_u, length_normalize=means)
    # rank 0's call, with rank 1's (sum, count) of mismatched log-ratios arriving through the reduce
    other = ranks[1]
    other_sum = sum((kp - kr) / (k if means else 1) for kp, kr, k in zip(other[3], other[4], other[5]))
    out = Objective("kto", params)(_unpaired(*ranks[0]), reduce=_two_rank_reduce(
        torch.tensor([other_sum, float(len(other[3]))], dtype=F64)))
    assert out.losses.tolist() == pytest.approx(want[0], rel=1e-12, abs=1e-14)
    assert float(out.reference_point) == pytest.approx(z0, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx(
        [beta * (p - q) / (k if means else 1) for p, q, k in zip(*ranks[0][:3])], rel=1e-12)
    # alone, rank 0 would have another z0: the reduce is what couples the ranks
    alone, _ = _kto_expected(ranks[:1], beta, lambda_d, lambda_u, means)
    assert Objective("kto", params)(_unpaired(*ranks[0])).losses.tolist() == pytest.approx(alone[0], rel=1e-12)
    assert alone[0] != pytest.approx(want[0], rel=1e-6)
    _ = kto  # the menu's function is what Objective ran (the spec's fn)
    assert SPECS["kto"].fn is kto


def test_kto_gradients_match_the_formula_and_the_reference_point_has_none():
    """d loss_i / d log pi(y_i): -lambda_D beta s'(beta (r - z0)) for desirable, +lambda_U beta s'(beta (z0 - r))
    for undesirable; the mismatched completions' log-probs get no gradient (z0 is detached)."""
    inputs = _kto_inputs(7, n=8)
    beta, lambda_d, lambda_u = 0.4, 1.2, 0.8
    u = _unpaired(*inputs, requires_grad=True)
    out = Objective("kto", LossParams(beta=beta, desirable_weight=lambda_d, undesirable_weight=lambda_u))(u)
    grad_policy, grad_kl = torch.autograd.grad(out.losses.sum(), (u.policy, u.kl_policy), allow_unused=True)
    assert grad_kl is None or torch.count_nonzero(grad_kl) == 0
    z0 = _kto_expected([inputs], beta, 1, 1)[1]  # the reference point does not depend on the weights
    h = 1e-6
    for i, label in enumerate(inputs[6]):
        bumped = [list(v) for v in inputs]
        bumped[0][i] += h
        up = _kto_expected([bumped], beta, lambda_d, lambda_u)[0][0][i]
        bumped[0][i] -= 2 * h
        down = _kto_expected([bumped], beta, lambda_d, lambda_u)[0][0][i]
        assert grad_policy[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-10)
        s = sigmoid_(beta * ((inputs[0][i] - inputs[1][i]) - z0))
        closed = -lambda_d * beta * s * (1 - s) if label else lambda_u * beta * s * (1 - s)
        assert grad_policy[i].item() == pytest.approx(closed, rel=1e-9)


def test_kto_reference_point_is_clamped_at_zero():
    policy, reference, tokens, kl_policy, _, kl_tokens, labels = _kto_inputs(9, n=5)
    kl_reference = [v + 5.0 for v in kl_policy]  # the policy below the reference on mismatched pairs: z0 < 0
    u = _unpaired(policy, reference, tokens, kl_policy, kl_reference, kl_tokens, labels)
    out = Objective("kto", LossParams(beta=0.3))(u)
    assert float(out.reference_point) == 0.0
    want = [1 - sigmoid_(0.3 * (p - q)) if lab else 1 - sigmoid_(-0.3 * (p - q))
            for p, q, lab in zip(policy, reference, labels)]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12)


def test_kto_weight_advice_follows_the_papers_ratio_bounds():
    """lambda_D n_D / (lambda_U n_U) in [1, 4/3] (KTO paper eq. 8): no advice; outside, weights that bring it in."""
    from dpo_ds.losses import kto_weight_advice

    assert kto_weight_advice(100, 100, 1.0, 1.0) is None
    assert kto_weight_advice(100, 100, 1.3, 1.0) is None
    advice = kto_weight_advice(100, 400, 1.0, 1.0)  # ratio 1/4
    assert "0.25" in advice and "desirable_weight in [4, 5.33]" in advice and "undesirable_weight in [0.188, 0.25]" in advice
    for d in (4.0, 5.33):
        assert kto_weight_advice(100, 400, d, 1.0) is None
    for u in (0.188, 0.25):
        assert kto_weight_advice(100, 400, 1.0, u) is None
    assert kto_weight_advice(10, 0, 1.0, 1.0) is None  # one label only: no ratio to balance
