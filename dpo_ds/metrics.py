"""Step metrics: per-pair sums accumulated on each rank, reduced over the data-parallel ranks (each pair once),
written to metrics.jsonl and TensorBoard by rank 0."""
from __future__ import annotations

import contextlib
import json
import resource
import time
from pathlib import Path

import torch

from dpo_ds.losses import LossOutput, PairLogps, UnpairedLogps
from dpo_ds.parallel import Parallel
from launcher.dist import all_reduce

# Quantities summed over pairs (or tokens) between two log lines; the names of the means derive from them.
_SUMS = ("pairs", "loss", "reward_chosen", "reward_rejected", "correct", "logp_chosen", "logp_rejected",
         "kl_chosen", "kl_rejected", "tokens_chosen", "tokens_rejected", "real_tokens", "padded_tokens",
         "step_time", "steps",
         # unpaired examples (KTO): how many of each label (chosen = desirable), and KTO's reference point z0
         "desirable", "undesirable", "reference_point", "micro_steps")


class SectionTimer:
    """Wall time per named section of the step (used by `dpo-ds bench`); synchronises the accelerator around
    each section so asynchronous GPU work is charged to the section that launched it."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()
        started = time.perf_counter()
        yield
        get_accelerator().synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - started


@contextlib.contextmanager
def untimed(name: str):
    yield


def peak_memory_gib() -> float:
    """Peak GPU allocation on an accelerator, peak resident memory (RSS) of this process on CPU."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return acc.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class PairStats:
    """Running sums of one logging window on this rank, kept on the communication device (the GPU under NCCL):
    adding a micro-batch's device tensors never waits for the device; only `reduce` and `total` do."""

    def __init__(self, parallel: Parallel, device: torch.device | None = None, components: tuple[str, ...] = ()):
        """`components`: the losses of a loss_type list, whose per-pair losses are summed too (`loss/<name>`)."""
        self.parallel = parallel
        self.components = components
        self.sums = torch.zeros(len(_SUMS) + len(components), dtype=torch.float64,
                                device=parallel.device if device is None else device)

    def _add(self, name: str, value) -> None:
        self._add_at(_SUMS.index(name), value)

    def _add_at(self, i: int, value) -> None:
        if isinstance(value, torch.Tensor):
            self.sums[i:i + 1] += value.detach().to(self.sums.device, torch.float64, non_blocking=True).reshape(1)
        else:
            self.sums[i] += value

    def add_pairs(self, lp: PairLogps, out: LossOutput, real_tokens: int, padded_tokens: int) -> None:
        self._add("pairs", len(out.losses))
        self._add("loss", out.losses.sum())
        self._add("reward_chosen", out.chosen_rewards.sum())
        self._add("reward_rejected", out.rejected_rewards.sum())
        self._add("correct", (out.chosen_rewards > out.rejected_rewards).sum())
        self._add("logp_chosen", lp.policy_chosen.sum())
        self._add("logp_rejected", lp.policy_rejected.sum())
        self._add("kl_chosen", (lp.policy_chosen.detach() - lp.ref_chosen).sum())
        self._add("kl_rejected", (lp.policy_rejected.detach() - lp.ref_rejected).sum())
        self._add("tokens_chosen", lp.chosen_tokens.sum())
        self._add("tokens_rejected", lp.rejected_tokens.sum())
        self._add("real_tokens", real_tokens)
        self._add("padded_tokens", padded_tokens)
        for i, name in enumerate(self.components, start=len(_SUMS)):
            self._add_at(i, out.components[name].sum())

    def add_unpaired(self, u: UnpairedLogps, out: LossOutput, real_tokens: int, padded_tokens: int) -> None:
        """An unpaired micro-batch: the chosen/rejected sums hold the desirable/undesirable examples'; "correct"
        counts the examples on their label's side of the reference point (log-ratio above z0 when desirable)."""
        desirable = u.labels
        logratio = u.policy.detach() - u.reference
        self._add("pairs", len(out.losses))
        self._add("loss", out.losses.sum())
        self._add("desirable", desirable.sum())
        self._add("undesirable", (~desirable).sum())
        self._add("reward_chosen", torch.where(desirable, out.chosen_rewards, 0.0).sum())
        self._add("reward_rejected", torch.where(desirable, 0.0, out.chosen_rewards).sum())
        self._add("correct", torch.where(desirable, logratio > out.reference_point, logratio < out.reference_point).sum())
        for side, mine in (("chosen", desirable), ("rejected", ~desirable)):
            self._add(f"logp_{side}", torch.where(mine, u.policy.detach(), 0.0).sum())
            self._add(f"kl_{side}", torch.where(mine, logratio, 0.0).sum())
            self._add(f"tokens_{side}", torch.where(mine, u.tokens, 0).sum())
        self._add("reference_point", out.reference_point)
        self._add("micro_steps", 1)
        self._add("real_tokens", real_tokens)
        self._add("padded_tokens", padded_tokens)

    def add_step_time(self, seconds: float) -> None:
        self._add("step_time", seconds)
        self._add("steps", 1)

    def total(self, name: str) -> float:
        return float(self.sums[_SUMS.index(name)])

    def merge(self, other: "PairStats") -> None:
        self.sums += other.sums

    def reduce(self) -> dict[str, float]:
        """Means over every pair of the window (each once: summed over the data-parallel ranks); token rates use
        the slowest rank's time."""
        reduced = self.parallel.sum_over_data(self.sums).tolist()
        s = dict(zip(_SUMS, reduced))
        # every rank runs the same steps: time and step count of the slowest rank, not summed over ranks
        window_time, steps = all_reduce(self.sums[[_SUMS.index("step_time"), _SUMS.index("steps")]], "max").tolist()
        pairs, steps = max(s["pairs"], 1.0), max(steps, 1.0)
        unpaired = s["micro_steps"] > 0  # KTO: chosen/rejected means are over the desirable/undesirable examples
        chosen, rejected = (max(s["desirable"], 1.0), max(s["undesirable"], 1.0)) if unpaired else (pairs, pairs)
        return {
            "loss": s["loss"] / pairs,
            "rewards/chosen": s["reward_chosen"] / chosen,
            "rewards/rejected": s["reward_rejected"] / rejected,
            "rewards/margins": s["reward_chosen"] / chosen - s["reward_rejected"] / rejected,
            "rewards/accuracies": s["correct"] / pairs,
            "logps/chosen": s["logp_chosen"] / chosen,
            "logps/rejected": s["logp_rejected"] / rejected,
            # mean per-token log pi - log pi_ref over completions: the seed's drift monitor
            "kl/chosen": s["kl_chosen"] / max(s["tokens_chosen"], 1.0),
            "kl/rejected": s["kl_rejected"] / max(s["tokens_rejected"], 1.0),
            "num_tokens": s["real_tokens"],
            "token_occupancy": s["real_tokens"] / max(s["padded_tokens"], 1.0),
            "tokens_per_s": s["real_tokens"] / window_time if window_time > 0 else 0.0,
            "step_time_s": window_time / steps,
            "window_steps": steps,  # optimizer steps this row covers (fewer in the first window after a resume)
            **{f"loss/{name}": total / pairs for name, total in zip(self.components, reduced[len(_SUMS):])},
            # KTO's reference point z0, mean over the window's micro-steps (the same value on every rank)
            **({"kl": s["reference_point"] / s["micro_steps"]} if unpaired else {}),
        }


def max_over_ranks(value: float) -> float:
    return float(all_reduce(torch.tensor([value], dtype=torch.float64), "max"))


TENSORBOARD_FLUSH_S = 10  # how stale TensorBoard's view of a running job may be


class MetricsWriter:
    """metrics.jsonl (one object per logged step, flushed at once) and tensorboard/ under the run folder."""

    def __init__(self, output_dir: str, enabled: bool, after_step: int = 0):
        """`after_step` > 0 when resuming: lines logged after that step by the interrupted run are dropped, so
        every step appears once."""
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self.jsonl = path.open("a")
        # TensorBoard's writer thread flushes every TENSORBOARD_FLUSH_S and at close, not after every step
        self.tensorboard = SummaryWriter(str(out / "tensorboard"), flush_secs=TENSORBOARD_FLUSH_S)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        # one event holding every scalar of the step: an event per scalar cost a queue hand-off to the writer
        # thread each, ~2% of a small step at logging_steps 1 (BENCHMARKS.md §14)
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import scalar

        values = [proto for name, value in metrics.items() if isinstance(value, (int, float))
                  for proto in scalar(name, value).value]
        # SummaryWriter's own add_* methods reach the file writer the same way (it reopens one after close)
        self.tensorboard._get_file_writer().add_summary(Summary(value=values), step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
