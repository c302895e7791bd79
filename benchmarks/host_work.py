"""Host work between training steps: what `dpo-ds train` does after each step that is not the step itself
(the NaN/Inf guard, the metric window's reduction, metrics.jsonl and TensorBoard writes, the console line, the
stop-signal check across ranks), timed against the step, with `logging_steps: 1` (the most of it per step).
One process, in-process `dpo-ds train` on the embedded demo assets (the small shape: a 6-layer model, ~25-token
sequences, 8 pairs a step); evaluation and checkpoints off, so the gap between two steps is only host work.
  python benchmarks/host_work.py [--steps 40] [--workdir /tmp/host-work] [-- TRAIN_FLAGS...]
Prints one JSON line: the step's and the gap's median and mean (ms), the gap's share of a step, and per
function (the loop's own methods) mean ms per step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMED = ("guard_bad_step", "log", "checkpoint_or_stop")  # TrainingLoop's methods between two steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3, help="Steps left out of the statistics.")
    p.add_argument("--workdir", default="/tmp/dpo-ds-host-work")
    p.add_argument("train_flags", nargs=argparse.REMAINDER)
    a = p.parse_args()
    work = Path(a.workdir)
    assets = work / "assets"
    if not (assets / "model").is_dir():
        subprocess.run([sys.executable, "-m", "dpo_ds.demo_data", str(assets)], check=True, cwd=REPO)

    import dpo_ds.trainer as trainer
    from dpo_ds import cli

    starts, ends = [], []
    per_method = {name: [] for name in TIMED}
    step = trainer.train_step

    def timed_step(*args, **kwargs):
        starts.append(time.perf_counter())
        try:
            return step(*args, **kwargs)
        finally:
            ends.append(time.perf_counter())

    def timed_method(name):
        method = getattr(trainer.TrainingLoop, name)

        def wrapper(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                per_method[name].append(time.perf_counter() - t)
        return wrapper

    trainer.train_step = timed_step
    for name in TIMED:
        setattr(trainer.TrainingLoop, name, timed_method(name))
    flags = [x for x in a.train_flags if x != "--"]
    # examples/demo.yaml's run, less its held-out pairs (no evaluation), with a log line after every step
    code = cli.main(["train", "--model_name_or_path", str(assets / "model"), "--train_file", str(assets / "train.jsonl"),
                     "--output_dir", str(work / "run"), "--overwrite", "true", "--beta", "0.5", "--max_length", "64",
                     "--micro_batch_size", "8", "--learning_rate", "1e-3", "--precision", "fp32",
                     "--max_steps", str(a.steps), "--logging_steps", "1", "--save_steps", "0", *flags])
    if code != 0:
        return code
    keep = slice(a.warmup, None)
    steps_s = [e - s for s, e in zip(starts, ends)][keep]
    gaps_s = [nxt - end for end, nxt in zip(ends, starts[1:])][keep]  # after step k's end, before step k+1's start
    ms = lambda xs: round(1000 * xs, 3)  # noqa: E731
    print(json.dumps({
        "steps_timed": len(steps_s), "step_ms": {"median": ms(statistics.median(steps_s)), "mean": ms(statistics.fmean(steps_s))},
        "between_steps_ms": {"median": ms(statistics.median(gaps_s)), "mean": ms(statistics.fmean(gaps_s)),
                             "max": ms(max(gaps_s))},
        "between_steps_share_of_step": round(statistics.fmean(gaps_s) / statistics.fmean(steps_s), 5),
        "per_method_ms": {name: ms(statistics.fmean(v[keep])) for name, v in per_method.items() if v[keep]},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
