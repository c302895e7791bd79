"""The summary of a benchmarks/gpu.sh run: reads OUT/results.jsonl (one line per phase and per step) and each
step's output (OUT/steps/NAME.log: `dpo-ds bench --json` prints its result as the last line, gpu_checks.py one
{"check": ...} line per check), writes OUT/summary.json and prints one table row per step.

    python benchmarks/gpu_summary.py OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def json_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def summarize(out: Path) -> dict:
    lines = json_lines(out / "results.jsonl")
    phases = {line["phase"]: line["budget_s"] for line in lines if "budget_s" in line}
    steps = []
    for line in lines:
        if "run" not in line:
            continue
        step = dict(line)
        produced = json_lines(out / "steps" / f"{line['run']}.log")
        results = [r for r in produced if "tokens_per_s" in r]
        if results:
            step["result"] = results[-1]
        checks = [r for r in produced if "check" in r]
        if checks:
            step["checks"] = checks
        step["status"] = ("skipped" if "skipped" in line else "ok" if line.get("exit") == 0
                          and all(c.get("ok") for c in checks) else "failed")
        steps.append(step)
    return {"phases": phases, "steps": steps,
            "counts": {s: sum(step["status"] == s for step in steps) for s in ("ok", "failed", "skipped")}}


def main(out: str) -> int:
    summary = summarize(Path(out))
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{'phase':<32} {'step':<44} {'status':<8} {'s':>5}  result")
    for step in summary["steps"]:
        result = step.get("result", {})
        shown = (f"{result['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in result
                 else step.get("skipped", ""))
        print(f"{step['phase']:<32} {step['run']:<44} {step['status']:<8} {step.get('seconds', ''):>5}  {shown}")
    print(json.dumps({"steps": summary["counts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
