"""slurm/dpo.sbatch's automatic restart after a failed step (issue 24): requeue only after progress, a bounded
number of times, with a doubling wait (dpo_ds.restart)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpo_ds.restart import NoRestart, main, restart_delay


def publish_checkpoint(output_dir: Path, step: int, at: float) -> None:
    ckpt = output_dir / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    os.utime(ckpt / "manifest.json", (at, at))
    (output_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")


def test_restart_needs_a_checkpoint_newer_than_the_start(tmp_path):
    with pytest.raises(NoRestart, match="no checkpoint .* since this start"):
        restart_delay(str(tmp_path), since=1000.0, restarts=0, max_restarts=3, backoff_s=60)
    publish_checkpoint(tmp_path, 4, at=900.0)  # from an earlier start of the job
    with pytest.raises(NoRestart, match="no checkpoint .* since this start"):
        restart_delay(str(tmp_path), since=1000.0, restarts=0, max_restarts=3, backoff_s=60)
    publish_checkpoint(tmp_path, 6, at=1100.0)
    assert [restart_delay(str(tmp_path), 1000.0, n, 3, 60) for n in range(3)] == [60, 120, 240]
    with pytest.raises(NoRestart, match="already restarted 3 time"):
        restart_delay(str(tmp_path), since=1000.0, restarts=3, max_restarts=3, backoff_s=60)


def test_command_reads_output_dir_from_the_config_or_the_flag(tmp_path, capsys):
    run = tmp_path / "run"
    publish_checkpoint(run, 2, at=2000.0)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {run}\nbeta: 0.1\n")
    args = ["--since", "1000", "--restarts", "1", "--max_restarts", "2", "--backoff_s", "30"]
    assert main([*args, "--config", str(config), "--resume_from", "auto", "--beta", "0.2"]) == 0
    assert capsys.readouterr().out == "60\n"
    assert main([*args, "--config", str(config), "--output_dir", str(tmp_path / "other")]) == 1
    assert f"no checkpoint in {Path(tmp_path / 'other' / 'checkpoints')}" in capsys.readouterr().err
