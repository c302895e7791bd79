"""`python -m launcher <dpo-ds args>`: what sbatch, srun, mpirun and torchrun start.

Resolves the distributed environment (cheap: no torch import, no rendezvous),
exports the torchrun-style variables (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) so everything downstream sees one
uniform environment, then runs `dpo_ds.cli.main(argv)` in this process and exits
with its status.  The trainer joins the process group via
`launcher.dist.init_distributed()`.

Exit status: the trainer's; 2 when the environment is unusable (LauncherError) or deepspeed/transformers
are outside their tested versions (dpo_ds.versions).
"""
from __future__ import annotations

import os
import sys

from dpo_ds.versions import check_versions
from launcher.dist import exit_process
from launcher.env import LauncherError, resolve, strip_local_rank


def main(argv: list[str] | None = None) -> int:
    argv, local_rank = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    if not check_versions("launcher"):
        return 2
    try:
        env = resolve(os.environ)
    except LauncherError as e:
        print(f"launcher: error: {e}", file=sys.stderr, flush=True)
        return 2
    os.environ.update(env.as_environ())
    if env.rank == 0 or os.environ.get("LAUNCHER_VERBOSE"):
        print(f"launcher: {env.describe()}", file=sys.stderr, flush=True)

    from dpo_ds.cli import main as cli_main

    return int(cli_main(argv) or 0)  # the rendezvous's LauncherError: reported by dpo-ds itself (exit 1)


if __name__ == "__main__":
    exit_process(main())
