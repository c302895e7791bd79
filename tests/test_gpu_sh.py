"""benchmarks/gpu.sh --dry-run: every phase and step of the GPU script starts on the CPU at tiny sizes and
writes its JSON line, and benchmarks/gpu_summary.py reads them back (issue 20), before any GPU runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dpo_ds.plan import ASSUMED_MFU
from helpers import REPO

pytestmark = pytest.mark.distributed  # starts the script, which starts ranks and the CLI

BENCHES = ["mfu_2k_live_ref", "mfu_2k_precompute_ref", "mfu_8k_live_ref", "mfu_8k_precompute_ref",
           "zero3_2k_precompute_ref", "long_32k_pair_tiled_mlp", "zero3_fused_adam_2k_precompute_ref"]
STEPS = {  # phase -> its steps, in order; each writes one line
    "checks": ["launcher.dist", "gpu_checks"],
    **{f"bench_{name}": [name] for name in BENCHES},
    "trl": ["trl"],
    "train": ["train_live_ref", "convert", "eval", "train_qlora_nf4", "train_precompute_ref_padding_free"],
}


def test_gpu_sh_dry_run_starts_every_step_and_summarizes_them(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=1500, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["phase"] for line in lines if "budget_s" in line] == list(STEPS)
    ran = {(line["phase"], line["run"]): line for line in lines if "run" in line}
    assert sorted(ran) == sorted((phase, step) for phase, steps in STEPS.items() for step in steps)
    # what the CPU can run, ran and succeeded; gpu_checks needs CUDA, and QLoRA on one CPU rank stops in
    # bitsandbytes' CPU state_dict (its packed-weight assertion): their lines are there, their exit is not checked
    cpu_steps = ["train_live_ref", "convert", "eval", "train_precompute_ref_padding_free", "launcher.dist",
                 *BENCHES[:-1]]
    assert [s for (_, s), line in ran.items() if s in cpu_steps and line.get("exit") != 0] == []
    assert "exit" in ran[("checks", "gpu_checks")]
    assert ran[(f"bench_{BENCHES[-1]}", BENCHES[-1])]["skipped"].startswith("dry run")
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["phase"], s["run"]) for s in summary["steps"]] == list(ran)
    benches = [s for s in summary["steps"] if s["phase"].startswith("bench_") and "exit" in s]
    assert len(benches) == 6 and all(s["result"]["tokens_per_s"] > 0 for s in benches)  # bench's own JSON
    # each benchmark's measured MFU (against the dry run's nominal 1 TFLOP/s) next to plan's projection for its
    # shape: plan's FLOPs of the step are the ones bench counted, and the projected time is those FLOPs at the
    # assumed MFU of that peak
    for s in benches:
        result, projected = s["result"], s["projection"]
        assert result["mfu"] == pytest.approx(result["tflops_per_s"] / result["peak_tflops_per_device"])
        assert projected["flops_per_step"] == pytest.approx(result["flops_per_step"], rel=1e-9), s["run"]
        assert projected["step_time_s"] == pytest.approx(
            result["flops_per_step"] / (result["peak_tflops_per_device"] * 1e12 * ASSUMED_MFU), rel=1e-9)
        assert projected["measured_step_time_s"] == result["step_time_s"]["median"]
    assert {s["result"]["lengths"] for s in benches} == {"fixed:64", "fixed:128", "fixed:256"}
    assert f"plan at {ASSUMED_MFU:.0%} MFU" in proc.stdout
    counts = summary["counts"]
    assert sum(counts.values()) == len(ran) and json.dumps({"steps": counts}) in proc.stdout
