"""The summary of a benchmarks/gpu.sh run: reads OUT/results.jsonl (one line per phase and per step) and each
step's output (STEPS_DIR/NAME.log, default OUT/steps: `dpo-ds bench --json` prints its result as the last line,
gpu_checks.py one {"check": ...} line per check), writes OUT/summary.json and prints one table row per step.

Each benchmark of fixed-length pairs gets `dpo-ds plan`'s projection for its shape (model, sequence length, micro
batch, accumulation, ranks, S, reference, LoRA, gradient checkpointing): plan's FLOPs of one optimizer step on the
peak the benchmark's MFU was measured against, at plan's assumed MFU, next to what was measured.

    python benchmarks/gpu_summary.py OUT [STEPS_DIR]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from dpo_ds.plan import ASSUMED_MFU, Projection, Setup, load_shape, setup_flops

REFERENCE_OF_BENCH = {"live": "gpu", "cached": "precomputed", "none": "none"}  # bench's word -> plan's


def json_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def projection(result: dict) -> dict | None:
    """Plan's projection for the shape a `dpo-ds bench --json` result ran; None for lengths that are not fixed
    (plan models sequences of one length) or without a peak (a CPU run without --peak_tflops)."""
    kind, _, length = result["lengths"].partition(":")
    peak = result.get("peak_tflops_per_device")
    if kind != "fixed" or not peak:
        return None
    setup = Setup(nodes=1, gpus_per_node=result["world_size"], gpu_memory_gb=0, cpu_memory_gb=0,
                  seq_len=int(length), micro_batch_size=result["micro_batch_size"],
                  gradient_accumulation_steps=result["gradient_accumulation_steps"], precision=result["precision"],
                  reference=REFERENCE_OF_BENCH[result["reference"]], lora_r=result["lora_r"],
                  sequence_parallel_size=result["sequence_parallel_size"])
    flops = setup_flops(load_shape(result["model"]), setup, recompute=result["gradient_checkpointing"])
    projected = Projection(flops, result["world_size"], peak, ASSUMED_MFU)
    return {**projected.to_dict(), "measured_step_time_s": result["step_time_s"]["median"],
            "measured_over_projected_time": result["step_time_s"]["median"] / projected.step_time_s}


def summarize(out: Path, steps_dir: Path) -> dict:
    lines = json_lines(out / "results.jsonl")
    phases = {line["phase"]: line["budget_s"] for line in lines if "budget_s" in line}
    steps = []
    for line in lines:
        if "run" not in line:
            continue
        step = dict(line)
        produced = json_lines(steps_dir / f"{line['run']}.log")
        results = [r for r in produced if "tokens_per_s" in r]
        if results:
            step["result"] = results[-1]
            if "lengths" in step["result"]:  # dpo-ds bench's (TRL's result has no shape to project)
                step["projection"] = projection(step["result"])
        checks = [r for r in produced if "check" in r]
        if checks:
            step["checks"] = checks
        step["status"] = ("skipped" if "skipped" in line else "ok" if line.get("exit") == 0
                          and all(c.get("ok") for c in checks) else "failed")
        steps.append(step)
    return {"phases": phases, "steps": steps,
            "counts": {s: sum(step["status"] == s for step in steps) for s in ("ok", "failed", "skipped")}}


def shown(step: dict) -> str:
    """The table's result column: measured tokens/s, MFU and peak memory; plan's projection beside them."""
    result = step.get("result")
    if not result:
        return step.get("skipped", "")
    text = f"{result['tokens_per_s']:.0f} tokens/s"
    if result.get("mfu") is not None:
        text += f", MFU {result['mfu']:.1%}"
    if "peak_memory_gib" in result:
        text += f", peak {result['peak_memory_gib']:.1f} GiB"
    plan = step.get("projection")
    if plan:
        text += (f" | plan at {plan['assumed_mfu']:.0%} MFU: {plan['tokens_per_s']:.0f} tokens/s, "
                 f"{plan['step_time_s']:.3g} s/step (measured {plan['measured_step_time_s']:.3g})")
    return text


def main(out: str, steps_dir: str | None = None) -> int:
    summary = summarize(Path(out), Path(steps_dir) if steps_dir else Path(out) / "steps")
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{'phase':<40} {'step':<36} {'status':<8} {'s':>5}  result")
    for step in summary["steps"]:
        print(f"{step['phase']:<40} {step['run']:<36} {step['status']:<8} {step.get('seconds', ''):>5}  {shown(step)}")
    print(json.dumps({"steps": summary["counts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
