"""The DPO loss family: the menu of losses (menu.py: each one a function and its spec), and the objective a run
trains: one loss or a weighted list of them (`loss_type`, `loss_weights`), on sums or per-token means of the
log-probs, plus the RPO term. config, the trainer, `dpo-ds eval`, checkpoints and the docs derive what they
need from the specs through the functions here.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from dpo_ds.losses.menu import PARAMS, SPECS
from dpo_ds.losses.spec import (LossContext, LossOutput, LossParams, LossSpec, PairLogps, Param, RunningMean,
                                UnpairedLogps)

LOSS_TYPES = tuple(SPECS)
ALIASES = {alias: spec.name for spec in SPECS.values() for alias in spec.aliases}
# Config fields that define the objective: `dpo-ds eval` takes them from the run it scores, and a resumed run
# must keep them (checkpoint.RESUME_SENSITIVE_FIELDS).
OBJECTIVE_FIELDS = ("loss_type", "loss_weights", *PARAMS)

__all__ = ["ALIASES", "LOSS_TYPES", "OBJECTIVE_FIELDS", "PARAMS", "SPECS", "LossContext", "LossOutput", "LossParams",
           "LossSpec", "Objective", "PairLogps", "Param", "RunningMean", "UnpairedLogps", "check_objective",
           "compute_loss", "kto_weight_advice", "loss_names", "loss_unit", "markdown_table", "needs_reference", "parse_loss_type",
           "parse_loss_weights", "uses_reference"]


def parse_loss_type(value: Any) -> str:
    """A `loss_type` value (a name, a comma-separated list, or a YAML list) as the config stores it: canonical
    names joined by commas. ValueError names the first unknown name and lists the valid ones."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"expected a loss name or a list of them, got {value!r}")
    canonical = []
    for name in (n.strip() for n in names):
        name = ALIASES.get(name, name)
        if name not in SPECS:
            raise ValueError(f"{name!r} is not one of {', '.join(LOSS_TYPES)} (or {', '.join(ALIASES)})")
        if name in canonical:
            raise ValueError(f"{name!r} is listed twice")
        canonical.append(name)
    return ",".join(canonical)


def parse_loss_weights(value: Any) -> str:
    """`loss_weights` (a YAML list of numbers or a comma-separated string) as the config stores it."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"expected a list of numbers, got {value!r}")
    try:
        weights = [float(v) for v in items if not isinstance(v, bool)]
    except (TypeError, ValueError):
        raise ValueError(f"expected a list of numbers, got {value!r}") from None
    if len(weights) != len(items) or not all(torch.isfinite(torch.tensor(weights))):
        raise ValueError(f"expected a list of finite numbers, got {value!r}")
    return ",".join(repr(w) for w in weights)


def loss_names(loss_type: str) -> tuple[str, ...]:
    return tuple(loss_type.split(","))


def _weights(loss_type: str, loss_weights: Optional[str]) -> tuple[float, ...]:
    return tuple(float(w) for w in loss_weights.split(",")) if loss_weights else (1.0,) * len(loss_names(loss_type))


def needs_reference(loss_type: str) -> bool:
    """Whether some loss of `loss_type` (a config's value) reads log pi_ref."""
    return any(SPECS[name].reference for name in loss_names(loss_type))


def loss_unit(loss_type: str) -> str:
    """What one training example of `loss_type` is: "pair" or "unpaired" (LossSpec.unit; one unit per run)."""
    return SPECS[loss_names(loss_type)[0]].unit


# Settings that only apply to losses on pairs (an unpaired loss refuses them)
_PAIR_ONLY = {"rpo_alpha": 0.0, "use_weighting": False, "ld_alpha": None}


def uses_reference(cfg) -> bool:
    """Whether the run needs log pi_ref: some loss of loss_type does and reference_free is off."""
    return not cfg.reference_free and needs_reference(cfg.loss_type)


def check_objective(cfg) -> Optional[tuple[str, str]]:
    """(field, why) of the first invalid loss setting of a config, or None."""
    names = loss_names(cfg.loss_type)
    specs = [SPECS[n] for n in names]
    for param in PARAMS.values():
        why = param.check(getattr(cfg, param.name))
        if why:
            return param.name, why
    if cfg.loss_weights is not None:
        weights = _weights(cfg.loss_type, cfg.loss_weights)
        if len(weights) != len(names):
            return "loss_weights", (f"{len(weights)} weights for the {len(names)} losses of loss_type "
                                    f"{cfg.loss_type}; give one weight per loss")
        if any(w < 0 for w in weights):
            return "loss_weights", f"must be >= 0, got {cfg.loss_weights}"
    units = {s.unit for s in specs}
    if len(units) > 1:
        unpaired = [s.name for s in specs if s.unit == "unpaired"]
        return "loss_type", (f"{', '.join(unpaired)} trains on unpaired examples and cannot be combined with losses "
                             f"on preference pairs ({cfg.loss_type})")
    if units == {"unpaired"}:
        for name, off in _PAIR_ONLY.items():
            if getattr(cfg, name) != off:
                return name, f"only applies to losses on preference pairs, not {cfg.loss_type}"
    for name in ("label_smoothing", "desirable_weight", "undesirable_weight"):
        if getattr(cfg, name) != PARAMS[name].default and not any(name in s.params for s in specs):
            readers = [s.name for s in SPECS.values() if name in s.params]
            return name, f"only applies to loss_type {', '.join(readers)}, not {cfg.loss_type}"
    if cfg.length_normalize and all(s.per_token_means for s in specs):
        sums = [s.name for s in SPECS.values() if not s.per_token_means]
        return "length_normalize", (f"loss_type {cfg.loss_type} is always length-normalised; the flag only applies "
                                    f"to {', '.join(sums)}")
    return None


class Objective:
    """What a run minimises: the weighted sum of its losses (each on sums or per-token means), plus the RPO term;
    it holds the losses' state across steps (spec.state)."""

    def __init__(self, loss_type: str, params: LossParams, loss_weights: Optional[str] = None):
        self.specs = [SPECS[name] for name in loss_names(loss_type)]
        self.weights = _weights(loss_type, loss_weights)
        self.params = params
        self.states = {s.name: s.state() for s in self.specs if s.state is not None}
        self.unit = self.specs[0].unit

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        return cls(cfg.loss_type, LossParams(**{name: getattr(cfg, name) for name in LossParams.__dataclass_fields__}),
                   cfg.loss_weights)

    @property
    def logged_components(self) -> tuple[str, ...]:
        """The losses logged one by one (`loss/<name>`): those of a loss_type list."""
        return tuple(s.name for s in self.specs) if len(self.specs) > 1 else ()

    def __call__(self, lp: PairLogps | UnpairedLogps, train: bool = True,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> LossOutput:
        """Per-pair (or per unpaired example) losses and rewards of one micro-batch. `train`: a training
        micro-step (the losses' states advance); `reduce`: the sum over ranks (the identity in one process); every
        rank calls it at every micro-step. The rewards are the first loss's."""
        total, first, components = None, None, {}
        for spec, weight in zip(self.specs, self.weights):
            means = spec.per_token_means or self.params.length_normalize
            out = spec.fn(lp.normalized() if means else lp,
                          LossContext(self.params, self.states.get(spec.name), train, reduce))
            total = weight * out.losses if total is None else total + weight * out.losses
            first = out if first is None else first
            components[spec.name] = out.losses.detach()
        if self.params.rpo_alpha > 0:
            total = total - self.params.rpo_alpha * lp.policy_chosen / lp.chosen_tokens.clamp(min=1)
        if self.params.use_weighting:  # as TRL: the weights scale the whole per-pair loss, RPO term included
            total = total * lp.wpo_weights
        return LossOutput(total, first.chosen_rewards, first.rejected_rewards,
                          components if self.logged_components else {}, first.reference_point)

    def state_dict(self) -> dict[str, dict]:
        return {name: state.state_dict() for name, state in self.states.items()}

    def load_state_dict(self, saved: dict[str, dict]) -> None:
        for name, state in self.states.items():
            if name in saved:
                state.load_state_dict(saved[name])

    def metrics(self) -> dict[str, float]:
        """What the losses report from their state (spec.metrics), as `<loss>/<name>`."""
        return {f"{s.name}/{m}": self.states[s.name].metrics()[m] for s in self.specs for m in s.metrics}


def kto_weight_advice(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float
                      ) -> Optional[str]:
    """The KTO paper's advice (arXiv 2402.01306, eq. 8) when desirable_weight x desirable examples over
    undesirable_weight x undesirable examples is outside [1, 4/3], with the weights that bring it in (one or the
    other, as TRL suggests); None when it is inside."""
    if not desirable or not undesirable:
        return None
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    d_low = undesirable_weight * undesirable / desirable
    u_high = desirable_weight * desirable / undesirable
    return (f"kto: {desirable} desirable and {undesirable} undesirable examples with desirable_weight "
            f"{desirable_weight:g} and undesirable_weight {undesirable_weight:g} give lambda_D n_D / (lambda_U n_U) = "
            f"{ratio:.3g}, outside the KTO paper's [1, 4/3]; set EITHER desirable_weight in [{d_low:.3g}, "
            f"{4 / 3 * d_low:.3g}] OR undesirable_weight in [{3 / 4 * u_high:.3g}, {u_high:.3g}]")


def markdown_table() -> str:
    """docs/training.md's table of the loss menu, from the specs (tests/test_docs.py keeps the page in step)."""
    lines = ["| `loss_type` | per-pair loss | parameters | use it when | TRL name |", "|---|---|---|---|---|"]
    for spec in SPECS.values():
        notes = [f"`{p}`" for p in spec.params]
        notes += [] if spec.reference else ["no reference"]
        notes += ["per-token means"] if spec.per_token_means else []
        notes += ["state: running mean, checkpointed"] if spec.state is not None else []
        notes += ["sorts the micro-batch"] if spec.batch_level else []
        notes += ["unpaired rows"] if spec.unit == "unpaired" else []
        trl = spec.trl_name or "same" + "".join(f" (older: `{alias}`)" for alias in spec.aliases)
        cells = (f"`{spec.name}`", spec.formula, ", ".join(notes), spec.use_when, trl)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def compute_loss(loss_type: str, lp: PairLogps | UnpairedLogps, params: LossParams) -> LossOutput:
    """The per-pair losses of `loss_type` (one name or a comma-separated list with weights 1) on one batch."""
    if any(name not in SPECS for name in loss_names(loss_type)):
        raise KeyError(loss_type)
    return Objective(loss_type, params)(lp)
