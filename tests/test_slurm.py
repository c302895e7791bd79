"""slurm/*.sbatch on a real two-node Slurm cluster on 127.0.0.1 (tests/slurm_cluster.py).

Skipped only when Slurm cannot run here at all (not root, or .ci/install_slurm.sh
failed); a cluster that is installed but does not come up is a failure.

    smoke        a 2-node sbatch job with srun; the launcher's rendezvous through srun
    stub         dpo.sbatch's signal forwarding and self-requeue, with a stub trainer
                 that honours the preemption contract (independent of dpo_ds)
    train        the real trainer: 2 nodes via srun, 2 nodes via torchrun, an
                 external `scontrol requeue` mid-run that must resume, not restart, a rank
                 killed after a checkpoint (RESTART_ON_FAILURE), and bad input under srun
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmStartError, SlurmUnavailable, slurm_cluster

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
DPO_SBATCH = REPO / "slurm" / "dpo.sbatch"
CONVERT_SBATCH = REPO / "slurm" / "convert.sbatch"


@pytest.fixture(scope="module")
def slurm():
    try:
        with slurm_cluster() as cluster:
            yield cluster
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    except SlurmStartError as e:
        pytest.fail(f"the test Slurm cluster did not start:\n{e}")


def job_env(cluster, **extra):
    """What the contract asks of a CPU test job; LAUNCHER_VERBOSE makes every rank say who it is."""
    return cluster.env({"MASTER_ADDR": "127.0.0.1", "DS_ACCELERATOR": "cpu", "DPO_DS_PYTHON": sys.executable,
                        "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1", "LAUNCHER_VERBOSE": "1", **extra})


def submit(cluster, workdir: Path, args, **env) -> int:
    (workdir / "logs").mkdir(parents=True, exist_ok=True)  # dpo.sbatch logs to logs/%x-%j.out
    return cluster.sbatch(["--chdir", str(workdir), *map(str, args)], env=job_env(cluster, **env))


def job_log(workdir: Path, job_id: int, name: str = "dpo") -> str:
    path = workdir / "logs" / f"{name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def assert_completed(cluster, info, workdir, job_id, name="dpo"):
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"job {job_id}: {info['JobState']} {info['ExitCode']}\n{job_log(workdir, job_id, name)[-8000:]}"


def metric_steps(out_dir: Path) -> list[int]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(cluster, job_id: int, out_dir: Path, step: int, workdir: Path, timeout_s: float = 300) -> int:
    """Block until metrics.jsonl shows `step` (the job is mid-training); returns the last step seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = metric_steps(out_dir)
        if steps and max(steps) >= step:
            return max(steps)
        state = cluster.job(job_id)["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), \
            f"job {job_id} ended ({state}) before step {step}:\n{job_log(workdir, job_id)[-8000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no step {step} after {timeout_s}s:\n{job_log(workdir, job_id)[-8000:]}")


# ----------------------------------------------------------------------------- smoke
def test_two_node_batch_job(slurm, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nsrun --ntasks-per-node=1 -l printenv SLURMD_NODENAME\n")
    job = slurm.sbatch(["-N", "2", "-o", str(tmp_path / "hello.out"), str(script)])
    info = slurm.wait(job, timeout_s=60)
    out = (tmp_path / "hello.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    assert sorted(out.split("\n")[:2]) == ["0: n1", "1: n2"], out


def test_launcher_rendezvous_through_srun(slurm):
    """srun -N 2: each task resolves itself from SLURM_* and they meet (no trainer involved)."""
    proc = slurm.run(["srun", "-N", "2", "--ntasks-per-node=1", sys.executable, "-m", "launcher.dist",
                      "--timeout", "60"], env=job_env(slurm), timeout=240, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"launcher: rank {rank}/2 (local 0/1) via slurm" in proc.stdout + proc.stderr
    assert proc.stdout.count("allreduce=3 expected=3") == 2, proc.stdout


# ----------------------------------------------------------------------------- stub trainer
STUB_CLI = '''
"""Stub dpo_ds.cli honouring the trainer's contract: SIGTERM/SIGUSR1 -> finish the step,
checkpoint, exit 75; --resume_from auto resumes and logs `resumed from step K`."""
import argparse, json, signal, sys, time
from pathlib import Path

def main(argv):
    import torch, torch.distributed as dist
    from launcher.dist import init_distributed
    p = argparse.ArgumentParser()
    for name in ("command", "--config", "--resume_from", "--output_dir"):
        p.add_argument(name)
    p.add_argument("--max_steps", type=int)
    p.add_argument("--step_s", type=float)
    a = p.parse_args(argv)
    got = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda s, f: got.append(s))
    env = init_distributed(timeout_s=60)
    out = Path(a.output_dir)
    ckpt = out / "checkpoint"
    step = 0
    if a.resume_from == "auto" and ckpt.exists():
        step = int(ckpt.read_text())
        if env.rank == 0:
            print(f"resumed from step {step}", file=sys.stderr, flush=True)
    while step < a.max_steps:
        time.sleep(a.step_s)
        step += 1
        if env.rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step}) + "\\n")
        stop = torch.tensor([float(bool(got))])
        dist.all_reduce(stop)  # every rank stops after the same step
        if stop.item():
            if env.rank == 0:
                ckpt.write_text(str(step))
            dist.barrier()
            return 75
    dist.barrier()
    if env.rank == 0:
        (out / "final").mkdir()
    return 0
'''


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_time_limit_signal_requeues_and_resumes_stub(slurm, tmp_path, mode):
    """USR1 to the batch shell (what --signal=B:USR1@300 sends) -> forwarded -> 75 -> self-requeue."""
    stub = tmp_path / "stub" / "dpo_ds"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "cli.py").write_text(STUB_CLI)
    # the program `python -m launcher` (srun) and torchrun start: `python -m dpo_ds`, whose status is the job step's
    (stub / "__main__.py").write_text("import sys\nfrom dpo_ds.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    out.mkdir()
    job = submit(slurm, tmp_path, ["-N", "2", DPO_SBATCH, "unused.yaml", "--output_dir", out,
                                   "--max_steps", 16, "--step_s", 0.5],
                 PYTHONPATH=str(stub.parent), LAUNCH_MODE=mode)
    seen = wait_for_step(slurm, job, out, 2, tmp_path)
    slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
    info = slurm.wait(job, timeout_s=300)
    log = job_log(tmp_path, job)
    assert_completed(slurm, info, tmp_path, job)
    assert int(info["Restarts"]) >= 1, log
    assert "received SIGUSR1" in log and "requeueing job" in log, log
    resumed = [int(k) for k in re.findall(r"resumed from step (\d+)", log)]
    assert resumed and seen <= resumed[0] < 16, log
    assert max(metric_steps(out)) == 16 and (out / "final").is_dir(), log


# ----------------------------------------------------------------------------- real trainer
def write_run_config(tmp_path: Path, assets, max_steps: int, save_steps: int = 0) -> tuple[Path, Path]:
    import yaml

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": assets.model_dir, "train_file": assets.train_file, "output_dir": str(out),
        "max_steps": max_steps, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
        "save_steps": save_steps, "logging_steps": 1, "precision": "fp32",
        "deepspeed_config": str(REPO / "ds_configs" / "zero3_cpu.json"),
    }))
    return config, out


def assert_trained(out: Path, max_steps: int, log: str) -> None:
    steps = metric_steps(out)
    assert steps and max(steps) == max_steps, f"metric steps {steps}\n{log[-8000:]}"
    final = out / "final"
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors")), log[-8000:]


@pytest.mark.parametrize("mode,source", [("srun", "slurm"), ("torchrun", "torchrun")])
def test_train_two_nodes(slurm, tmp_path, demo_assets, mode, source):
    config, out = write_run_config(tmp_path, demo_assets, max_steps=4)
    job = submit(slurm, tmp_path, ["-N", "2", DPO_SBATCH, config], LAUNCH_MODE=mode)
    info = slurm.wait(job, timeout_s=600)
    log = job_log(tmp_path, job)
    assert_completed(slurm, info, tmp_path, job)
    for rank in (0, 1):  # both ranks of a world of 2 took part
        assert f"launcher: rank {rank}/2 (local 0/1) via {source}" in log, log[-8000:]
    assert_trained(out, 4, log)


def test_preempted_job_requeues_and_resumes(slurm, tmp_path, demo_assets):
    """`scontrol requeue` mid-run: SIGTERM -> checkpoint -> 75; the job comes back and resumes.

    save_steps=0, so the only checkpoint is the one written on the signal: resuming
    from step K > 0 proves the signal path worked.
    """
    max_steps = 200
    config, out = write_run_config(tmp_path, demo_assets, max_steps=max_steps)
    job = submit(slurm, tmp_path, ["-N", "2", DPO_SBATCH, config])
    seen = wait_for_step(slurm, job, out, 3, tmp_path)
    slurm.run(["scontrol", "requeue", str(job)])
    info = slurm.wait(job, timeout_s=600)
    log = job_log(tmp_path, job)
    assert_completed(slurm, info, tmp_path, job)
    assert int(info["Restarts"]) >= 1, log[-8000:]
    assert "training step exited with status 75" in log, log[-8000:]
    resumed = [int(k) for k in re.findall(r"resumed from step (\d+)", log)]
    assert resumed and seen <= resumed[0] < max_steps, log[-8000:]
    assert_trained(out, max_steps, log)


CRASHING_RANK = '''"""Test hook on PYTHONPATH (tests/test_slurm.py): in Slurm task 1 of the launcher (`python -m launcher`)
during the job's first CRASH_STARTS starts, SIGKILL this process as soon as its first checkpoint save returns
(every rank's files written and `latest` published): a rank that dies mid-run, as on a crashed node. Killed
inside the save's return, not by a watcher polling `latest`, so the run cannot get to a later checkpoint first
however fast its steps are."""
import os, signal, sys, threading, time

if os.environ.get("SLURM_PROCID") == "1" and sys.argv[:1] == ["-m"] \
        and int(os.environ.get("SLURM_RESTART_COUNT") or 0) < int(os.environ["CRASH_STARTS"]):

    def kill_after_first_save():
        # dpo_ds.checkpoint comes in with the trainer, seconds before step 1
        while getattr(sys.modules.get("dpo_ds.checkpoint"), "save_checkpoint", None) is None:
            time.sleep(0.005)
        checkpoint = sys.modules["dpo_ds.checkpoint"]
        save = checkpoint.save_checkpoint

        def save_then_die(*args, **kwargs):
            save(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.save_checkpoint = save_then_die

    threading.Thread(target=kill_after_first_save, daemon=True).start()
'''


def test_a_rank_killed_after_a_checkpoint_restarts_the_job_up_to_n_times(slurm, tmp_path, demo_assets):
    """Issue 24: RESTART_ON_FAILURE=1. Start 0: a rank dies after the step-2 checkpoint -> the job requeues itself
    and resumes from it. Start 1: the rank dies again after the step-4 checkpoint -> not restarted a second
    time: the job ends failed."""
    config, out = write_run_config(tmp_path, demo_assets, max_steps=40, save_steps=2)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASHING_RANK)
    job = submit(slurm, tmp_path, ["-N", "2", DPO_SBATCH, config], RESTART_ON_FAILURE="1", RESTART_BACKOFF_S="1",
                 CRASH_OUTPUT_DIR=str(out), CRASH_STARTS="2",
                 PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]))
    info = slurm.wait(job, timeout_s=900)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and int(info["Restarts"]) == 1, f"{info}\n{log[-8000:]}"
    statuses = [int(s) for s in re.findall(r"training step exited with status (\d+)", log)]
    assert len(statuses) == 2 and all(s not in (0, 2, 75, 130) for s in statuses), log[-8000:]
    assert "automatic restart 1 of 1 in 1s" in log and "requeueing job" in log, log[-8000:]
    assert re.findall(r"resumed from step (\d+)", log) == ["2"], log[-8000:]
    assert "not restarting: already restarted 1 time(s)" in log, log[-8000:]
    assert (out / "checkpoints" / "latest").read_text().strip().endswith("4"), log[-8000:]


def test_bad_input_under_srun_is_one_line_and_exit_status_2(slurm, tmp_path):
    """Issue 25 item 1 under srun (`python -m launcher`, as dpo.sbatch runs it): one line from one rank of each
    node, and the step's status is dpo-ds's 2 (no automatic restart, no requeue)."""
    config = tmp_path / "bad.yaml"
    config.write_text(f"model_name_or_path: {tmp_path / 'no_model'}\ntrain_file: {tmp_path / 'no.jsonl'}\n")
    job = submit(slurm, tmp_path, ["-N", "2", DPO_SBATCH, config], RESTART_ON_FAILURE="3", RESTART_BACKOFF_S="1")
    info = slurm.wait(job, timeout_s=300)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and int(info["Restarts"]) == 0, log[-8000:]
    line = f"dpo-ds train: error: field 'train_file': {tmp_path / 'no.jsonl'}: no such file or directory"
    errors = [x for x in log.splitlines() if x.startswith("dpo-ds train: error:")]
    assert errors and errors == [line] * len(errors) and len(errors) <= 2, log[-8000:]  # at most one per node
    assert "Traceback" not in log and "training step exited with status 2" in log, log[-8000:]


def test_convert_sbatch_runs_convert(slurm, tmp_path):
    """convert.sbatch hands its arguments to `python -m dpo_ds convert` (stubbed here)."""
    stub = tmp_path / "stub" / "dpo_ds"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "__main__.py").write_text("import sys\nprint('convert-args', sys.argv[1:])\nsys.exit(0)\n")
    job = submit(slurm, tmp_path, [CONVERT_SBATCH, "ckpt_dir", "out_dir", "--dtype", "fp32"],
                 PYTHONPATH=str(stub.parent))
    info = slurm.wait(job, timeout_s=120)
    log = job_log(tmp_path, job, "dpo-convert")
    assert_completed(slurm, info, tmp_path, job, "dpo-convert")
    assert "convert-args ['convert', 'ckpt_dir', 'out_dir', '--dtype', 'fp32']" in log, log
