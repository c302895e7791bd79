"""Start N ranks of a program on this machine and end with the program's exit status: what
`dpo-ds train --nproc_per_node N` runs, where torchrun's agent would turn every status into 1 and add its own
traceback and summary to the program's one error line.

    status = run_local_ranks(2, [sys.executable, "-m", "dpo_ds", "train", "--config", "run.yaml"])

Each rank gets the torchrun-style variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR
127.0.0.1, a free MASTER_PORT) with DPO_DS_DIST_SOURCE=local, and its share of the cores (OMP_NUM_THREADS).
SIGINT, SIGTERM and SIGUSR1 sent to this process are passed on to every rank (a dpo-ds rank takes a SIGINT within 2 s of the terminal's own for the same Ctrl-C).
The status is the first failed rank's (0 when all succeed); once a rank has failed, the others get
FAILURE_GRACE_S to end on their own (bad input: every rank stops with the same status), then SIGKILL (a rank
that crashed leaves the others nothing to checkpoint together).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Mapping, Sequence

from launcher.env import SOURCE_VAR, free_port, rank_defaults

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
FAILURE_GRACE_S = 10.0


def rank_environ(environ: Mapping[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment of local rank `rank` of `nproc`: this one's, with the rank variables of a one-node job, the
    RANK_DEFAULTS it does not set, and each rank's share of this process's cores as OMP_NUM_THREADS unless set.

    Without the share every rank starts one thread per core, so N ranks run N threads a core, each spinning while
    it waits for the others (OpenMP's wait policy): on a 2-core machine the demo's 2 ranks took 124 s instead of
    29 s. torchrun sets 1 for the same reason."""
    threads = {} if "OMP_NUM_THREADS" in environ else {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0))
                                                                                  // nproc))}
    return {**environ, **rank_defaults(environ), **threads, "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), SOURCE_VAR: "local"}


def run_local_ranks(nproc: int, command: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """Run `command` as ranks 0..nproc-1 of one job on this machine; its exit status (see the module docstring)."""
    environ = os.environ if environ is None else environ
    port = free_port()
    ranks = [subprocess.Popen(list(command), env=rank_environ(environ, rank, nproc, port)) for rank in range(nproc)]

    def forward(signum, frame) -> None:
        for proc in ranks:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        status, failed_at = 0, None
        while any(proc.poll() is None for proc in ranks):
            if status == 0:
                status = next((_status(proc) for proc in ranks if proc.returncode not in (None, 0)), 0)
                failed_at = time.monotonic() if status else None
            elif time.monotonic() - failed_at > FAILURE_GRACE_S:
                for proc in ranks:
                    if proc.poll() is None:
                        proc.kill()
            time.sleep(0.1)
        return status or next((_status(proc) for proc in ranks if proc.returncode != 0), 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _status(proc: subprocess.Popen) -> int:
    """A shell's view of a rank's end: its exit code, or 128 + N when signal N ended it."""
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
