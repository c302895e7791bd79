"""The loss menu: each loss is one function of the pairs' log-probs and the spec beside it (dpo_ds.losses.spec).
Names are TRL DPOTrainer's `loss_type` names (2026), plus dpo-ds's `simpo`. Adding a loss: a function, its
spec in SPECS, and its test in tests/test_losses.py against the formula written out independently.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpo_ds.losses.spec import LossContext, LossOutput, LossSpec, PairLogps, Param, RunningMean, UnpairedLogps


def _in_range(low: float, high: float, low_open: bool = False, high_open: bool = False):
    def check(value):
        if value is None:
            return None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            return f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, got {value}"
        return None
    return check


# Every parameter a loss or the loss options read, by config field name: its default, help and valid values.
PARAMS = {p.name: p for p in (
    Param("beta", 0.1, "Inverse temperature of the implicit reward r = beta * (log pi - log pi_ref) (tau of IPO, "
                       "SPPO; beta of SimPO).", lambda v: None if v > 0 else f"must be > 0, got {v}"),
    Param("label_smoothing", 0.0, "epsilon: assumed label-flip rate for `sigmoid` (conservative DPO), `robust`, "
                                  "`aot`, `aot_unpaired`, and the target preference 1 - epsilon of `exo_pair` "
                                  "(1e-3 when 0); must be < 0.5.",
          lambda v: None if 0 <= v < 0.5 else f"must be in [0, 0.5): at 0.5 the labels carry no preference, got {v}"),
    Param("simpo_gamma", 0.5, "Target reward margin gamma of `simpo`."),
    Param("discopop_tau", 0.05, "Temperature tau of `discopop`'s mix of its logistic and exponential parts.",
          lambda v: None if v > 0 else f"must be > 0, got {v}"),
    Param("rpo_alpha", 0.0, "Weight of the mean per-token NLL of the chosen completion added to the loss (RPO); "
                            "0 = off.", lambda v: None if v >= 0 else f"must be >= 0, got {v}"),
    Param("length_normalize", False, "Use per-token mean log-probs instead of sums for the losses that read sums "
                                     "(every loss but ipo, sigmoid_norm, simpo, sft, which always use means)."),
    Param("desirable_weight", 1.0, "`kto`: weight lambda_D of the desirable examples' losses.",
          lambda v: None if v > 0 else f"must be > 0, got {v}"),
    Param("undesirable_weight", 1.0, "`kto`: weight lambda_U of the undesirable examples' losses.",
          lambda v: None if v > 0 else f"must be > 0, got {v}"),
    Param("use_weighting", False, "WPO: weight each pair's loss (RPO term included) by min(1, exp(w(y+) + w(y-))), "
                                  "w(y) = mean over y's tokens of log pi(y_t) - log sum_v pi(v)^2 under the policy, "
                                  "no gradient (TRL's use_weighting)."),
    Param("ld_alpha", None, "LD-DPO: each completion's log-prob is its first L tokens' sum plus ld_alpha x the "
                            "rest's, L = the shorter completion of the pair (policy and reference alike); "
                            "1 = plain sums, unset = off.", _in_range(0.0, 1.0)),
)}


def _rewards(lp: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (beta * lp.chosen_logratio).detach(), (beta * lp.rejected_logratio).detach()


def _reference_loss(losses: torch.Tensor, lp: PairLogps, ctx: LossContext) -> LossOutput:
    return LossOutput(losses, *_rewards(lp, ctx.params.beta))


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid(lp: PairLogps, ctx: LossContext) -> LossOutput:
    return _reference_loss(_smoothed_sigmoid(ctx.params.beta * lp.margin, ctx.params.label_smoothing), lp, ctx)


def robust(lp: PairLogps, ctx: LossContext) -> LossOutput:
    z, eps = ctx.params.beta * lp.margin, ctx.params.label_smoothing
    return _reference_loss((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), lp, ctx)


def ipo(lp: PairLogps, ctx: LossContext) -> LossOutput:
    return _reference_loss((lp.margin - 1 / (2 * ctx.params.beta)) ** 2, lp, ctx)


def hinge(lp: PairLogps, ctx: LossContext) -> LossOutput:
    return _reference_loss(torch.relu(1 - ctx.params.beta * lp.margin), lp, ctx)


def exo_pair(lp: PairLogps, ctx: LossContext) -> LossOutput:
    z = ctx.params.beta * lp.margin
    eps = ctx.params.label_smoothing or 1e-3  # as TRL: a zero target probability has no KL
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return _reference_loss(losses, lp, ctx)


def nca_pair(lp: PairLogps, ctx: LossContext) -> LossOutput:
    rc, rr = ctx.params.beta * lp.chosen_logratio, ctx.params.beta * lp.rejected_logratio
    return _reference_loss(-F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr), lp, ctx)


def bco_pair(lp: PairLogps, ctx: LossContext) -> LossOutput:
    rc, rr = ctx.params.beta * lp.chosen_logratio, ctx.params.beta * lp.rejected_logratio
    rewards = torch.cat([rc, rr]).detach()
    # the offset delta: mean reward of every completion trained on so far, this micro-step of every rank included
    delta = ctx.state.update(rewards, ctx.reduce) if ctx.train else ctx.state.mean.to(rewards)
    return _reference_loss(-F.logsigmoid(rc - delta) - F.logsigmoid(-(rr - delta)), lp, ctx)


def sppo_hard(lp: PairLogps, ctx: LossContext) -> LossOutput:
    half = 0.5 / ctx.params.beta
    return _reference_loss((lp.chosen_logratio - half) ** 2 + (lp.rejected_logratio + half) ** 2, lp, ctx)


def aot(lp: PairLogps, ctx: LossContext) -> LossOutput:
    policy = torch.sort(lp.policy_chosen - lp.policy_rejected).values
    reference = torch.sort(lp.ref_chosen - lp.ref_rejected).values
    return _reference_loss(_smoothed_sigmoid(ctx.params.beta * (policy - reference), ctx.params.label_smoothing), lp, ctx)


def aot_unpaired(lp: PairLogps, ctx: LossContext) -> LossOutput:
    delta = torch.sort(lp.chosen_logratio).values - torch.sort(lp.rejected_logratio).values
    return _reference_loss(_smoothed_sigmoid(ctx.params.beta * delta, ctx.params.label_smoothing), lp, ctx)


def apo_zero(lp: PairLogps, ctx: LossContext) -> LossOutput:
    beta = ctx.params.beta
    return _reference_loss(1 - torch.sigmoid(beta * lp.chosen_logratio) + torch.sigmoid(beta * lp.rejected_logratio),
                           lp, ctx)


def apo_down(lp: PairLogps, ctx: LossContext) -> LossOutput:
    beta = ctx.params.beta
    return _reference_loss(torch.sigmoid(beta * lp.chosen_logratio) + 1 - torch.sigmoid(beta * lp.margin), lp, ctx)


def discopop(lp: PairLogps, ctx: LossContext) -> LossOutput:
    z = ctx.params.beta * lp.margin
    mix = torch.sigmoid(z / ctx.params.discopop_tau)
    return _reference_loss(-F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix, lp, ctx)


def simpo(lp: PairLogps, ctx: LossContext) -> LossOutput:
    beta = ctx.params.beta
    losses = -F.logsigmoid(beta * (lp.policy_chosen - lp.policy_rejected) - ctx.params.simpo_gamma)
    return LossOutput(losses, (beta * lp.policy_chosen).detach(), (beta * lp.policy_rejected).detach())


def sft(lp: PairLogps, ctx: LossContext) -> LossOutput:
    beta = ctx.params.beta
    return LossOutput(-lp.policy_chosen, (beta * lp.policy_chosen).detach(), (beta * lp.policy_rejected).detach())


def kto(u: UnpairedLogps, ctx: LossContext) -> LossOutput:
    beta, params = ctx.params.beta, ctx.params
    # z0: mean log-ratio of the mismatched completions of this micro-step on every rank, detached, at least 0
    mismatched = (u.kl_policy - u.kl_reference).detach().double()
    total = ctx.reduce(torch.stack([mismatched.sum(), torch.tensor(float(mismatched.numel()), dtype=torch.float64,
                                                                   device=mismatched.device)]))
    z0 = (total[0] / total[1].clamp(min=1.0)).clamp(min=0.0).to(u.policy.dtype)
    desirable = params.desirable_weight * (1 - torch.sigmoid(beta * (u.logratio - z0)))
    undesirable = params.undesirable_weight * (1 - torch.sigmoid(beta * (z0 - u.logratio)))
    rewards = (beta * u.logratio).detach()
    return LossOutput(torch.where(u.labels, desirable, undesirable), rewards, rewards, reference_point=z0)


_SMOOTHED = ("beta", "label_smoothing")
SPECS = {s.name: s for s in (
    LossSpec("sigmoid", sigmoid, "−log σ(βd); with ε > 0 (conservative DPO) −(1−ε) log σ(βd) − ε log σ(−βd)",
             "the default; ε for noisy labels", params=_SMOOTHED),
    LossSpec("sigmoid_norm", sigmoid, "−log σ(βd̄), d̄ from per-token mean log-probs (length-normalised DPO)",
             "Tulu 3's recipe (`dpo_norm`): long chosen completions would otherwise win on length",
             per_token_means=True),
    LossSpec("robust", robust, "[−(1−ε) log σ(βd) + ε log σ(−βd)] / (1 − 2ε)",
             "labels flipped at a known rate ε (unbiased)", params=_SMOOTHED),
    LossSpec("ipo", ipo, "(d̄ − 1/(2β))², d̄ from per-token mean log-probs",
             "deterministic preferences where DPO over-fits", per_token_means=True),
    LossSpec("hinge", hinge, "max(0, 1 − βd)", "SLiC-style margin"),
    LossSpec("exo_pair", exo_pair, "σ(βd)(log σ(βd) − log(1−ε)) + σ(−βd)(log σ(−βd) − log ε), ε = 1e-3 when 0",
             "EXO: reverse KL to the preference target (mode seeking)", params=_SMOOTHED),
    LossSpec("nca_pair", nca_pair, "−log σ(β cl) − ½ log σ(−β cl) − ½ log σ(−β rl)",
             "NCA: keeps the chosen likelihood from falling (absolute, not relative, rewards)"),
    LossSpec("bco_pair", bco_pair, "−log σ(β cl − δ) − log σ(−(β rl − δ)), δ = running mean of all rewards so far",
             "BCO on pairs; MPO's quality term", state=RunningMean, metrics=("running_mean",)),
    LossSpec("sppo_hard", sppo_hard, "(cl − 1/(2β))² + (rl + 1/(2β))²",
             "SPPO with hard (0/1) win probabilities"),
    LossSpec("aot", aot, "−(1−ε) log σ(βΔ) − ε log σ(−βΔ), Δ = sort(pc − pr) − sort(rc − rr) over the micro-batch",
             "AOT: distributional dominance of the policy's log-ratio over the reference's", params=_SMOOTHED,
             batch_level=True),
    LossSpec("aot_unpaired", aot_unpaired, "as aot with Δ = sort(cl) − sort(rl) over the micro-batch",
             "AOT when chosen and rejected need not share a prompt", params=_SMOOTHED, batch_level=True,
             aliases=("aot_pair",)),
    LossSpec("apo_zero", apo_zero, "1 − σ(β cl) + σ(β rl)",
             "APO-zero (SmolLM3): chosen completions better than the model's own outputs"),
    LossSpec("apo_down", apo_down, "σ(β cl) + 1 − σ(βd)",
             "APO-down: chosen completions worse than the model's own outputs"),
    LossSpec("discopop", discopop, "−log σ(βd)(1 − m) + e^(−βd) m, m = σ(βd/τ), τ = `discopop_tau`",
             "DiscoPOP: the discovered log-ratio-modulated loss", params=("beta", "discopop_tau")),
    LossSpec("simpo", simpo, "−log σ(β(mean log π(y⁺) − mean log π(y⁻)) − γ), γ = `simpo_gamma`",
             "no reference model at all", params=("beta", "simpo_gamma"), reference=False, per_token_means=True,
             trl_name="CPOTrainer's `simpo`"),
    LossSpec("kto", kto, "λ_D (1 − σ(β(cl − z₀))) for a desirable completion, λ_U (1 − σ(β(z₀ − cl))) for an "
             "undesirable one; z₀ = max(0, mean log-ratio of mismatched prompt/completion pairs of the micro-step, "
             "all ranks), no gradient",
             "unpaired thumbs-up/down data (rows with a boolean `label`); paired data is split into a desirable and "
             "an undesirable row", params=("beta", "desirable_weight", "undesirable_weight"), unit="unpaired",
             trl_name="KTOTrainer's `kto`"),
    LossSpec("sft", sft, "mean per-token NLL of the chosen completion (TRL: over all chosen tokens of the batch)",
             "train the SFT model that becomes the reference; MPO's generation term", params=(), reference=False,
             per_token_means=True),
)}
