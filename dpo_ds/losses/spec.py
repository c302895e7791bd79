"""What a loss brings besides its function: its spec (parameters read, reference or not, per-token means or sums,
state across steps, what it reports), the loss parameters' own facts (default, help, valid range), and the
inputs and outputs every loss function shares.

Notation: pc/pr = policy log-prob of chosen/rejected, rc/rr = the reference's (0 when reference-free),
cl = pc - rc and rl = pr - rr (log-ratios), d = cl - rl, beta = `beta`, eps = `label_smoothing`. Log-probs
are sums over completion tokens, or per-token means where a loss says so (or `length_normalize` is on).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class PairLogps:
    """Per-pair inputs [B] of every loss: summed completion log-probs and completion token counts."""
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    # use_weighting: per completion, the sum over its tokens of log pi(y_t) - log sum_v pi(v)^2 (no gradient)
    wpo_chosen: Optional[torch.Tensor] = None
    wpo_rejected: Optional[torch.Tensor] = None

    def normalized(self) -> "PairLogps":
        """The same pairs with every log-prob divided by its completion's token count."""
        c, r = self.chosen_tokens.clamp(min=1), self.rejected_tokens.clamp(min=1)
        return PairLogps(self.policy_chosen / c, self.policy_rejected / r, self.ref_chosen / c,
                         self.ref_rejected / r, self.chosen_tokens, self.rejected_tokens, self.wpo_chosen,
                         self.wpo_rejected)

    @property
    def wpo_weights(self) -> torch.Tensor:
        """WPO's pair weights [B] (arXiv 2406.11827, as TRL's use_weighting): min(1, exp(w(y+) + w(y-))), w(y) the
        mean over y's tokens of log pi(y_t) - log sum_v pi(v)^2: the pair's probability under the policy,
        normalised per token by the probability that the policy's own samples agree there."""
        c, r = self.chosen_tokens.clamp(min=1), self.rejected_tokens.clamp(min=1)
        return torch.exp(self.wpo_chosen / c + self.wpo_rejected / r).clamp(max=1.0)

    @property
    def chosen_logratio(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratio(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:
        """d = (pc - rc) - (pr - rr)."""
        return self.chosen_logratio - self.rejected_logratio


@dataclass
class UnpairedLogps:
    """Per-example inputs [B] of an unpaired loss (KTO): each example's completion, and its mismatched completion
    (another example's completion after this example's prompt, for the KL reference point), as summed log-probs
    and token counts; `labels`: desirable (True) or undesirable."""
    policy: torch.Tensor
    reference: torch.Tensor
    tokens: torch.Tensor
    kl_policy: torch.Tensor
    kl_reference: torch.Tensor
    kl_tokens: torch.Tensor
    labels: torch.Tensor

    def normalized(self) -> "UnpairedLogps":
        """The same examples with every log-prob divided by its completion's token count."""
        n, k = self.tokens.clamp(min=1), self.kl_tokens.clamp(min=1)
        return UnpairedLogps(self.policy / n, self.reference / n, self.tokens, self.kl_policy / k,
                             self.kl_reference / k, self.kl_tokens, self.labels)

    @property
    def logratio(self) -> torch.Tensor:
        return self.policy - self.reference


@dataclass
class LossOutput:
    losses: torch.Tensor            # per pair (or unpaired example) [B]; the step minimises their mean
    chosen_rewards: torch.Tensor    # beta * (log pi - log pi_ref) of chosen, detached [B] (unpaired: of each example)
    rejected_rewards: torch.Tensor  # (unpaired: the same as chosen_rewards; `labels` tell them apart)
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # loss_type list: each one's per-pair loss, detached
    reference_point: Optional[torch.Tensor] = None  # KTO: the KL estimate z0 of the micro-step (over all ranks), detached


@dataclass(frozen=True)
class Param:
    """A number (or switch) a loss reads, as the config declares it: its default, its help text (also the
    field's `--help` and docs/configuration.md line), and the check of its value (the reason it is invalid,
    or None)."""
    name: str
    default: Any
    help: str
    check: Callable[[Any], Optional[str]] = lambda value: None


@dataclass(frozen=True)
class LossParams:
    """Every loss parameter's value in a run (config fields of the same names; see PARAMS)."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    rpo_alpha: float = 0.0
    length_normalize: bool = False
    use_weighting: bool = False
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


class RunningMean:
    """The mean of every value seen so far, over all ranks: `update` adds one micro-step's values of every rank
    (their sum and count, summed over ranks by `reduce`) before the loss reads the mean. Kept on the values'
    device in float64 (no device sync per step); its state is two floats, saved in the trainer state of a
    checkpoint and independent of the world size."""

    def __init__(self):
        self.total = torch.zeros(2, dtype=torch.float64)  # sum, count

    def update(self, values: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        local = torch.stack([values.detach().double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                                 device=values.device)])
        self.total = self.total.to(values.device) + reduce(local)
        return self.mean.to(values.dtype)

    @property
    def mean(self) -> torch.Tensor:
        return self.total[0] / self.total[1].clamp(min=1.0)

    def metrics(self) -> dict[str, float]:
        return {"running_mean": float(self.mean)}

    def state_dict(self) -> dict[str, float]:
        total, count = self.total.tolist()
        return {"sum": total, "count": count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total = torch.tensor([state["sum"], state["count"]], dtype=torch.float64)


@dataclass
class LossContext:
    """What a loss may read besides the pairs: the parameters, its state across steps (spec.state), whether this
    is a training micro-step (state is updated by training only) and the sum over ranks."""
    params: LossParams
    state: Any = None
    train: bool = True
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t


@dataclass(frozen=True)
class LossSpec:
    """One entry of the loss menu. The config's choices and checks, the trainer, `dpo-ds eval`, checkpoints and
    the docs read these facts; nothing else names a loss.

    unit: what one example of the loss is: a preference pair ("pair", PairLogps) or a labelled single completion
    ("unpaired", UnpairedLogps: KTO); the data path and the step feed each unit its own inputs.
    """
    name: str
    fn: Callable[[Any, LossContext], LossOutput]  # PairLogps or UnpairedLogps (unit) -> LossOutput
    formula: str                         # the per-pair loss, for docs/training.md
    use_when: str
    params: tuple[str, ...] = ("beta",)  # PARAMS entries it reads
    reference: bool = True               # needs log pi_ref (False: no reference model is built for it)
    per_token_means: bool = False        # always reads per-token mean log-probs (else sums, or means under length_normalize)
    state: Optional[Callable[[], Any]] = None  # builds its state held across steps (checkpointed: state_dict / load_state_dict)
    batch_level: bool = False            # couples the pairs of a micro-batch (not a per-pair function)
    trl_name: Optional[str] = None       # TRL's name when it differs
    aliases: tuple[str, ...] = ()        # other names accepted for it
    unit: str = "pair"
    metrics: tuple[str, ...] = ()        # what it logs beyond the common metrics, as <name>/<metric> (its state's metrics())
