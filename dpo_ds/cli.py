"""`dpo-ds` command line: one sub-command per module, imported only when it runs."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from launcher.dist import exit_process
from launcher.env import LauncherError, strip_local_rank

# sub-command -> module exposing `HELP`, `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "prepare": "dpo_ds.prepare",
    "train": "dpo_ds.trainer",
    "eval": "dpo_ds.evaluate",
    "convert": "dpo_ds.convert",
    "plan": "dpo_ds.plan",
    "bench": "dpo_ds.bench",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, local_rank = strip_local_rank(argv)  # `deepspeed --module dpo_ds ...` appends --local_rank=N
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    parser = argparse.ArgumentParser(prog="dpo-ds", description="Direct Preference Optimization on DeepSpeed ZeRO-3.")
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to do; `dpo-ds COMMAND --help` for its options")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
    module = importlib.import_module(COMMANDS[argv[0]])
    sub = argparse.ArgumentParser(prog=f"dpo-ds {argv[0]}", description=module.HELP,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except LauncherError as err:  # the rendezvous, or output_dir/cache_dir not shared by every rank
        print(f"dpo-ds {argv[0]}: error: {err}", file=sys.stderr, flush=True)
        return 1


def entry() -> None:
    """The `dpo-ds` console script and `python -m dpo_ds`."""
    exit_process(main())


if __name__ == "__main__":
    entry()
