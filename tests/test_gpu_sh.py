"""benchmarks/gpu.sh --dry-run: every phase and step of the GPU script starts on the CPU at tiny sizes and
writes its JSON line, and benchmarks/gpu_summary.py reads them back (issue 20), before any GPU runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.distributed  # starts the script, which starts ranks and the CLI

STEPS = {  # phase -> its steps, in order; each writes one line
    "checks": ["launcher.dist", "gpu_checks"],
    "train": ["train_live_ref", "train_precompute_ref_padding_free", "train_qlora_nf4", "convert", "eval"],
    "bench_live_ref_offload": ["dpo-ds_live_ref_offload"], "bench_precompute_ref": ["dpo-ds_precompute_ref"],
    "bench_logits_path": ["dpo-ds_logits_path+precompute_ref"], "bench_lora_r16": ["dpo-ds_lora_r16"],
    "bench_lognormal_padding_free": ["dpo-ds_lognormal_padding_free+precompute_ref"],
    "bench_adamw_torch_fused": ["adamw_torch_fused"], "bench_adamw_deepspeed_fused": ["adamw_deepspeed_fused"],
    "trl": ["trl"],
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
    cpu_steps = [*STEPS["train"][:2], "convert", "eval", "launcher.dist", *[s[0] for p, s in STEPS.items()
                                                                            if p.startswith("bench_")][:-1]]
    assert [s for (_, s), line in ran.items() if s in cpu_steps and line.get("exit") != 0] == []
    assert "exit" in ran[("checks", "gpu_checks")]
    assert ran[("bench_adamw_deepspeed_fused", "adamw_deepspeed_fused")]["skipped"].startswith("dry run")
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["phase"], s["run"]) for s in summary["steps"]] == list(ran)
    benches = [s for s in summary["steps"] if s["phase"].startswith("bench_") and "exit" in s]
    assert len(benches) == 6 and all(s["result"]["tokens_per_s"] > 0 for s in benches)  # bench's own JSON
    counts = summary["counts"]
    assert sum(counts.values()) == len(ran) and json.dumps({"steps": counts}) in proc.stdout
