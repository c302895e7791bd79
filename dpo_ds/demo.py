"""`make demo`: the whole job on the embedded default, no downloads.

1. Build the demo assets (preference pairs with a held-out split, a sentencepiece tokenizer trained on
   them, a tiny random-init Llama) under demo_runs/assets.
2. Score the held-out pairs with the starting model.
3. Train with 2-rank ZeRO-3 DPO on CPU (offloaded reference engine, gradient checkpointing) using
   examples/demo.yaml, exporting a Hugging Face model to demo_runs/dpo/final.
4. Score the held-out pairs again and print held-out preference accuracy before -> after.
Exits non-zero when the trained model is below 90% held-out accuracy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dpo_ds.demo_data import build_demo_assets

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "demo.yaml"
TARGET_ACCURACY = 0.9


def _run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo: command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return proc.stdout


def _evaluate(model: str, heldout: str, out: str, ref_model: str = "none") -> dict:
    cmd = [sys.executable, "-m", "dpo_ds", "eval", "--model", model, "--data", heldout, "--output", out, "--overwrite",
           "--ref_model", ref_model]
    return json.loads(_run(cmd).strip().splitlines()[-1])


def main() -> int:
    started = time.time()
    root = REPO / "demo_runs"
    assets = build_demo_assets(str(root / "assets"))
    before = _evaluate(assets.model_dir, assets.heldout_file, str(root / "eval_before.jsonl"))
    _run([sys.executable, "-m", "dpo_ds", "train", "--nproc_per_node", "2", "--config", str(CONFIG),
          "--overwrite", "true"])  # every `make demo` trains the demo again
    final = str(root / "dpo" / "final")
    after = _evaluate(final, assets.heldout_file, str(root / "eval_after.jsonl"))
    rewards = _evaluate(final, assets.heldout_file, str(root / "eval_after_rewards.jsonl"), ref_model=assets.model_dir)
    print(f"\nmetrics: {root / 'dpo' / 'metrics.jsonl'}   model: {final}   ({time.time() - started:.0f} s)")
    print(f"implicit-reward accuracy of the trained model against its reference: {rewards['accuracy']:.1%}")
    print(f"held-out preference accuracy (log pi(chosen) > log pi(rejected), {after['pairs']} pairs): "
          f"before {before['accuracy']:.1%} -> after {after['accuracy']:.1%}")
    if after["accuracy"] < TARGET_ACCURACY:
        print(f"demo: held-out accuracy below {TARGET_ACCURACY:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
