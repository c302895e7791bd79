"""Helpers for tests: multi-rank CPU launches on 127.0.0.1, config files, metrics."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def launch(args: list[str], nproc: int = 2, timeout: int = 600, check: bool = True, env: dict | None = None):
    """Run `python -m torch.distributed.run --nproc_per_node N <args>` (args: a script or `-m module ...`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc


def run_cli(args: list[str], timeout: int = 600, check: bool = True):
    """`python -m dpo_ds ARGS` as a single process."""
    proc = subprocess.run([sys.executable, "-m", "dpo_ds", *args], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dpo_ds {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc
