"""`python -m launcher <dpo-ds args>`: what sbatch, srun, mpirun and torchrun start.

Resolves the distributed environment (cheap: no torch import, no rendezvous),
exports the torchrun-style variables (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) so everything downstream sees one
uniform environment, adds the launcher.env.RANK_DEFAULTS it does not set, then
runs the dpo-ds program (`python -m dpo_ds`) in this process, as torchrun runs
a module: the launcher package never imports dpo-ds, which builds on it. The
trainer joins the process group through `launcher.dist.init_distributed()`.

Exit status: dpo-ds's; 2 when the environment is unusable (LauncherError).
"""
from __future__ import annotations

import os
import runpy
import sys

from launcher.dist import exit_process
from launcher.env import LauncherError, rank_defaults, resolve, strip_local_rank

PROGRAM = "dpo_ds"  # the module run with the resolved environment


def main(argv: list[str] | None = None) -> int:
    argv, local_rank = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    try:
        env = resolve(os.environ)
    except LauncherError as e:
        print(f"launcher: error: {e}", file=sys.stderr, flush=True)
        return 2
    os.environ.update(env.as_environ())
    os.environ.update(rank_defaults(os.environ))  # dpo-ds has not imported torch yet
    if env.rank == 0 or os.environ.get("LAUNCHER_VERBOSE"):
        print(f"launcher: {env.describe()}", file=sys.stderr, flush=True)
    sys.argv = [PROGRAM, *argv]
    try:
        runpy.run_module(PROGRAM, run_name="__main__", alter_sys=True)  # ends the process with dpo-ds's status
    except SystemExit as done:  # the program returned instead (argparse's usage errors, --help)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    exit_process(main())
