"""Where one training step's time goes: `dpo-ds bench ARGS` with its timed steps (not the warm-up) under cProfile,
summed per phase from the functions that carry each phase, per step. One process.
  python benchmarks/profile_step.py [--dump FILE.prof] -- BENCH_ARGS...
Phases (cumulative time of the named functions; a phase inside another is listed under it):
  reference forward   dpo_ds.reference LiveReference.logps
  policy forward      dpo_ds.scoring.forward_logps, less the reference's calls of it
  backward            DeepSpeedEngine.backward (autograd, gradient-checkpoint recompute, ZeRO hooks)
    gradient reduction  ZeRO-3 reduce_partition_and_remove_grads; stages 0-2 DeepSpeedEngine.allreduce_gradients
    numactl             deepspeed.utils.numa.get_numa_cores (the CPU accelerator's device_count)
  optimizer           DeepSpeedEngine.step (gradient norm, clipping, AdamW, ZeRO's partition copies)
  rest of the step    collation, loss, metrics: the step less the phases above
cProfile's own overhead inflates Python-heavy phases; read the split, not the absolute times.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys

PHASES = {  # phase -> (file suffix, function name) pairs whose cumulative time is the phase's
    "reference forward": [("dpo_ds/reference.py", "logps")],
    "policy forward": [("dpo_ds/scoring.py", "forward_logps")],
    "backward": [("deepspeed/runtime/engine.py", "backward")],
    "gradient reduction": [("deepspeed/runtime/zero/stage3.py", "reduce_partition_and_remove_grads"),
                           ("deepspeed/runtime/engine.py", "allreduce_gradients")],
    "numactl": [("deepspeed/utils/numa.py", "get_numa_cores")],
    "optimizer": [("deepspeed/runtime/engine.py", "step")],
    "step": [("dpo_ds/step.py", "train_step")],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump", help="Also write the raw profile here (pstats).")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    args = [x for x in a.bench_args if x != "--"]
    warmup = int(args[args.index("--warmup") + 1]) if "--warmup" in args else 2
    import dpo_ds.step as step_module
    from dpo_ds import cli

    profiler, timed = cProfile.Profile(), []
    original = step_module.train_step

    def profiled(ctx, sampler, pairs, step):
        if step < warmup:
            return original(ctx, sampler, pairs, step)
        timed.append(step)
        profiler.enable()
        try:
            return original(ctx, sampler, pairs, step)
        finally:
            profiler.disable()

    step_module.train_step = profiled
    code = cli.main(["bench", *args])
    stats = pstats.Stats(profiler)
    if a.dump:
        stats.dump_stats(a.dump)
    total = {}
    for phase, functions in PHASES.items():
        total[phase] = sum(cum for (file, _, name), (_, _, _, cum, _) in stats.stats.items()
                           if any(file.endswith(f) and name == n for f, n in functions))
    n = max(len(timed), 1)
    # the reference scores through forward_logps too
    total["policy forward"] -= total["reference forward"]
    rest = total["step"] - sum(total[k] for k in ("reference forward", "policy forward", "backward", "optimizer"))
    print(f"\n| phase (per step, {n} profiled steps) | s | share |\n|---|---:|---:|")
    for phase in ("reference forward", "policy forward", "backward", "gradient reduction", "numactl", "optimizer"):
        indent = "&nbsp;&nbsp;" if phase in ("gradient reduction", "numactl") else ""
        print(f"| {indent}{phase} | {total[phase] / n:.3f} | {total[phase] / total['step']:.1%} |")
    print(f"| rest of the step | {rest / n:.3f} | {rest / total['step']:.1%} |")
    print(f"| **step** | {total['step'] / n:.3f} | 100% |")
    return code


if __name__ == "__main__":
    sys.exit(main())
