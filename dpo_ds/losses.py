"""The DPO loss family: pure functions of per-pair log-probs, one per `loss_type`, and their registry.

Notation: pc/pr = policy log-prob of chosen/rejected, rc/rr = the reference's (0 when reference-free),
d = (pc - rc) - (pr - rr), beta = `beta`, eps = `label_smoothing`. Log-probs are sums over completion
tokens, or per-token means where a loss says so (or `length_normalize` is on). The implicit rewards
beta * (log pi - log pi_ref) are computed from the same log-probs the loss uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Per-pair inputs [B] of every loss: summed completion log-probs and completion token counts."""
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def normalized(self) -> "PairLogps":
        """The same pairs with every log-prob divided by its completion's token count."""
        c, r = self.chosen_tokens.clamp(min=1), self.rejected_tokens.clamp(min=1)
        return PairLogps(self.policy_chosen / c, self.policy_rejected / r, self.ref_chosen / c,
                         self.ref_rejected / r, self.chosen_tokens, self.rejected_tokens)


@dataclass
class LossOutput:
    losses: torch.Tensor            # per pair [B]; the step minimises their mean
    chosen_rewards: torch.Tensor    # beta * (log pi - log pi_ref) of chosen, detached [B]
    rejected_rewards: torch.Tensor


@dataclass(frozen=True)
class LossParams:
    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0
    length_normalize: bool = False


def _rewards(lp: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (beta * (lp.policy_chosen - lp.ref_chosen)).detach(), (beta * (lp.policy_rejected - lp.ref_rejected)).detach()


def _margin(lp: PairLogps) -> torch.Tensor:
    return (lp.policy_chosen - lp.ref_chosen) - (lp.policy_rejected - lp.ref_rejected)


def sigmoid(lp: PairLogps, p: LossParams) -> LossOutput:
    """DPO: -log sigma(beta d); with eps > 0 conservative DPO: -(1-eps) log sigma(beta d) - eps log sigma(-beta d)."""
    lp = lp.normalized() if p.length_normalize else lp
    z = p.beta * _margin(lp)
    losses = -(1 - p.label_smoothing) * F.logsigmoid(z) - p.label_smoothing * F.logsigmoid(-z)
    return LossOutput(losses, *_rewards(lp, p.beta))


def robust(lp: PairLogps, p: LossParams) -> LossOutput:
    """rDPO, unbiased for label-flip rate eps: [-(1-eps) log sigma(beta d) + eps log sigma(-beta d)] / (1 - 2 eps)."""
    lp = lp.normalized() if p.length_normalize else lp
    z = p.beta * _margin(lp)
    eps = p.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return LossOutput(losses, *_rewards(lp, p.beta))


def ipo(lp: PairLogps, p: LossParams) -> LossOutput:
    """IPO: (d - 1/(2 beta))^2 with d from per-token mean log-probs."""
    lp = lp.normalized()
    losses = (_margin(lp) - 1 / (2 * p.beta)) ** 2
    return LossOutput(losses, *_rewards(lp, p.beta))


def hinge(lp: PairLogps, p: LossParams) -> LossOutput:
    """SLiC hinge: max(0, 1 - beta d)."""
    lp = lp.normalized() if p.length_normalize else lp
    losses = torch.relu(1 - p.beta * _margin(lp))
    return LossOutput(losses, *_rewards(lp, p.beta))


def simpo(lp: PairLogps, p: LossParams) -> LossOutput:
    """SimPO: -log sigma(beta (mean log pi(y+) - mean log pi(y-)) - gamma); no reference."""
    lp = lp.normalized()
    losses = -F.logsigmoid(p.beta * (lp.policy_chosen - lp.policy_rejected) - p.simpo_gamma)
    return LossOutput(losses, (p.beta * lp.policy_chosen).detach(), (p.beta * lp.policy_rejected).detach())


def sft(lp: PairLogps, p: LossParams) -> LossOutput:
    """Supervised fine-tuning on chosen: mean per-token NLL of each chosen completion (rejected unused)."""
    lp = lp.normalized()
    return LossOutput(-lp.policy_chosen, (p.beta * lp.policy_chosen).detach(), (p.beta * lp.policy_rejected).detach())


LOSSES: dict[str, Callable[[PairLogps, LossParams], LossOutput]] = {
    "sigmoid": sigmoid, "robust": robust, "ipo": ipo, "hinge": hinge, "simpo": simpo, "sft": sft,
}


def compute_loss(loss_type: str, lp: PairLogps, p: LossParams) -> LossOutput:
    """LOSSES[loss_type] plus the RPO term rpo_alpha * (mean per-token NLL of chosen) when rpo_alpha > 0."""
    out = LOSSES[loss_type](lp, p)
    if p.rpo_alpha > 0:
        out.losses = out.losses - p.rpo_alpha * lp.policy_chosen / lp.chosen_tokens.clamp(min=1)
    return out
