"""Issue 24 finding 5a: when rank 0 dies or freezes during a phase of its own (preparing the data), the other ranks
stop with one clear line instead of waiting forever. The ranks are started as srun starts them without
--kill-on-bad-exit: one process each, nobody to end the others (no agent), rank 0 hosting the store."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, write_config

from launcher.env import free_port, rank_defaults

pytestmark = pytest.mark.distributed


def start_ranks(commands: list[list[str]], **extra_env) -> list[subprocess.Popen]:
    """One process per rank (Python arguments of rank 0, rank 1), joined as srun's tasks would be, with the
    environment `python -m launcher` gives them (its RANK_DEFAULTS)."""
    port = str(free_port())
    procs = []
    for rank, command in enumerate(commands):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "TORCHELASTIC"))}
        env.update(PYTHONPATH=str(REPO), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra_env)
        env.update(rank_defaults(env))
        procs.append(subprocess.Popen([sys.executable, *command], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def end(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for_file(path, procs, limit_s: float = 600) -> None:
    """Until `path` exists (rank 0 started preparing); fails when a rank ended first."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        for rank, proc in enumerate(procs):
            if proc.poll() is not None:
                raise AssertionError(f"rank {rank} ended ({proc.returncode}) before preparing:\n"
                                     f"{proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "rank 0 never started preparing"
        time.sleep(0.2)


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGSTOP"])
def test_rank0_killed_or_frozen_while_preparing_ends_the_wait_with_one_line(demo_assets, tmp_path, stop):
    """SIGKILL: rank 0's store refuses connections, noticed at the next poll (without the silence bound, left at
    its default here). SIGSTOP: the store accepts but never answers, noticed after LAUNCHER_RANK0_SILENCE_S."""
    config = write_config(tmp_path / "run.yaml", model_name_or_path=demo_assets.model_dir,
                          train_file=demo_assets.train_file, output_dir=str(tmp_path / "out"), precision="fp32",
                          micro_batch_size=2, max_steps=1, max_length=64, prepare_workers=1, dist_timeout_s=60)
    started = tmp_path / "preparing"
    silence = {"SIGSTOP": {"LAUNCHER_RANK0_SILENCE_S": "15"}, "SIGKILL": {}}[stop]
    train = ["tests/slow_prepare_probe.py", "train", "--config", str(config)]
    procs = start_ranks([train, train], SLOW_PREPARE_S="3600", SLOW_PREPARE_STARTED=str(started), **silence)
    try:
        wait_for_file(started, procs)
        os.kill(procs[0].pid, getattr(signal, stop))
        _, err = procs[1].communicate(timeout=300)  # a bound for a failure, not a timing: it used to wait forever
    finally:
        end(procs)
    lines = err.strip().splitlines()
    assert procs[1].returncode == 1, err[-3000:]
    assert lines[-1].startswith(f"dpo-ds train: error: rank 0 was lost while preparing {demo_assets.train_file}"), \
        err[-3000:]
    if stop == "SIGKILL":
        assert "its store at 127.0.0.1:" in lines[-1] and "rank 0 has probably died" in lines[-1]
    else:
        assert "its store has not answered for 15 s" in lines[-1] and "rank 0 is probably frozen" in lines[-1]
    assert [line for line in lines if "error:" in line] == [lines[-1]]
    assert "Traceback (most recent call last)" not in err  # no Python traceback
    assert "recvValue" not in err and "Exception raised from" not in err  # nor torch's C++ warning and frames


STORE_HOST = """
import sys, time, datetime, torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, True, datetime.timedelta(seconds=60), wait_for_workers=False)
print("up", flush=True)
time.sleep(600)
"""

DIES_DURING_A_REQUEST = f'''
import datetime, os, signal, subprocess, sys, threading, time
import torch.distributed as dist
import launcher.dist as ld
from launcher.env import free_port


def asked(port):
    """A request waits unread in a socket of the store's port: it has reached the stopped host."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, queues = line.split()[1], line.split()[4]
            if int(local.rsplit(":", 1)[1], 16) == port and int(queues.split(":")[1], 16) > 0:
                return True
    return False


port = free_port()
host = subprocess.Popen([sys.executable, "-c", {STORE_HOST!r}, str(port)], stdout=subprocess.PIPE, text=True)
assert host.stdout.readline().strip() == "up"
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
store = dist.TCPStore("127.0.0.1", port, 2, False, datetime.timedelta(seconds=60), wait_for_workers=False)
os.kill(host.pid, signal.SIGSTOP)  # as while the kernel tears a killed rank 0 down: connections accepted, no answer


def kill_once_asked():
    while not asked(port):
        time.sleep(0.01)
    os.kill(host.pid, signal.SIGKILL)  # its unread request makes the kernel reset the connection


threading.Thread(target=kill_once_asked, daemon=True).start()
try:
    ld._ask_store(store, 60, "working", time.monotonic())
except ld.Rank0Lost as err:
    print(err, flush=True)
finally:
    host.kill()  # in any case: a host left behind would hold the test's pipes open
'''


@pytest.mark.parametrize("user_level", [None, "WARNING"])
def test_rank0_dying_during_a_store_request_prints_no_cpp_warning(user_level):
    """The race test_rank0_killed... meets about 1 run in 3, made certain: rank 0 dies while the waiting rank's store
    request is in flight. Under the launcher's RANK_DEFAULTS the waiting rank's one line is all; a user's own
    TORCH_CPP_LOG_LEVEL wins (and shows that the race was met: torch's C++ warning with its frames)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CPP_LOG_LEVEL"}
    if user_level is not None:
        env["TORCH_CPP_LOG_LEVEL"] = user_level
    env.update(rank_defaults(env), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", DIES_DURING_A_REQUEST], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 was lost while working: its store at 127.0.0.1:" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "Connection reset by peer" in done.stdout  # died during the request, not before it
    warned = "recvValue" in done.stderr and "Exception raised from" in done.stderr
    assert warned is (user_level == "WARNING"), done.stderr[-3000:]


SILENT_RANK0 = r'''
import time
import launcher.dist as ld
from launcher.env import LauncherError
env = ld.init_distributed(timeout_s=60)
try:
    ld.on_rank0("working", lambda: time.sleep(600))
except LauncherError as err:
    print(f"{type(err).__name__}: {err}", flush=True)
ld.exit_process(0)
'''


def test_a_heartbeat_that_stops_while_the_store_answers_ends_the_wait():
    """As under torchrun, whose agent hosts the store: the store answers, rank 0's beat alone tells it is stuck.
    Rank 0 here never starts its heartbeat, so the wait stops after LAUNCHER_RANK0_SILENCE_S."""
    silent = "import launcher.dist as ld\nld.start_heartbeat = lambda: None\n" + SILENT_RANK0
    procs = start_ranks([["-c", silent], ["-c", SILENT_RANK0]], LAUNCHER_RANK0_SILENCE_S="6")
    try:
        out, err = procs[1].communicate(timeout=300)
    finally:
        end(procs)
    assert procs[1].returncode == 0, err[-3000:]
    said = out.strip().splitlines()[-1]
    silent_for = re.match(r"Rank0Lost: rank 0 was lost while working: its heartbeat has not moved for (\d+) s", said)
    assert silent_for and int(silent_for[1]) >= 6, out + err
    assert "rank 0 is probably frozen" in said and "Rank 1 stops instead of waiting forever" in said
