"""`dpo-ds` command line: one sub-command per module, imported only when it runs."""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from dpo_ds.compiled_ops import announce_op_build, default_extensions_dir
from dpo_ds.console import stdout_for_results_only
from dpo_ds.errors import EXIT_PREEMPTED, Preempted, UsageError
from dpo_ds.versions import check_versions
from launcher.dist import exit_process
from launcher.env import LauncherError, detect, strip_local_rank
from launcher.local import run_local_ranks

# sub-command -> module exposing `HELP`, `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "prepare": "dpo_ds.prepare",
    "train": "dpo_ds.trainer",
    "eval": "dpo_ds.evaluate",
    "convert": "dpo_ds.convert",
    "plan": "dpo_ds.plan",
    "bench": "dpo_ds.bench",
    "env": "dpo_ds.env_report",
}


# Deprecations inside the pinned libraries, repeated every step and not ours to fix: DeepSpeed 0.19 calls the
# torch collectives that torch 2.13 renamed.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated")
STARTS_DEEPSPEED = ("train", "eval", "bench")


class CommandParser(argparse.ArgumentParser):
    """A command's flags, spelled out: no prefix abbreviations (argparse would take `--learning_rat` for
    `--learning_rate`), and an unknown flag is one line naming it, with the closest flag, as YAML fields are."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        # an unknown flag first: it is often why a required one looks missing (`--modl` for `--model`)
        required = [action for action in self._actions if action.required]
        for action in required:
            action.required = False
        try:
            _, unknown = self.parse_known_args(args)
        finally:
            for action in required:
                action.required = True
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_args(args, namespace)

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            flags = [option for action in self._actions for option in action.option_strings]
            words = [w for w in unknown.group(1).split() if w.startswith("-")] or unknown.group(1).split()
            close = difflib.get_close_matches(words[0].split("=")[0], flags, n=1)
            message = f"unknown flag {words[0]}" + (f" (did you mean {close[0]}?)" if close else "") + \
                      f"; `{self.prog} --help` lists the flags"
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, local_rank = strip_local_rank(argv)  # `deepspeed --module dpo_ds ...` appends --local_rank=N
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    parser = argparse.ArgumentParser(prog="dpo-ds", description="Direct Preference Optimization on DeepSpeed ZeRO-3.")
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to do; `dpo-ds COMMAND --help` for its options")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
    # before the command's module imports deepspeed/transformers; `env` reports the versions itself
    if argv[0] != "env" and not check_versions(f"dpo-ds {argv[0]}"):
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    sub = CommandParser(prog=f"dpo-ds {argv[0]}", description=module.HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    if argv[0] == "train":
        sub.add_argument("--nproc_per_node", type=int, metavar="N",
                         help="Start N ranks of this training on this machine (one per GPU) and exit with "
                              "dpo-ds's status: what `torchrun --nproc_per_node N -m dpo_ds train` starts, "
                              "without the agent's traceback and summary, and its status 1 for every failure")
    args = sub.parse_args(argv[1:])
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    if getattr(args, "nproc_per_node", None) is not None and not args.check:
        return start_local_ranks(argv, args.nproc_per_node)
    if argv[0] in STARTS_DEEPSPEED:
        announce_op_build()
    return run_command(argv[0], module, args)


def start_local_ranks(argv: list[str], nproc: int) -> int:
    """`dpo-ds train --nproc_per_node N ...`: the same command, without the flag, as N ranks (launcher.local)."""
    if nproc < 1:
        print(f"dpo-ds {argv[0]}: error: --nproc_per_node must be at least 1, not {nproc}", file=sys.stderr)
        return 2
    if detect(os.environ) != "single":
        print(f"dpo-ds {argv[0]}: error: --nproc_per_node starts the ranks itself, and this process is already a "
              f"rank of a launcher (torchrun, srun, mpirun): drop the flag", file=sys.stderr)
        return 2
    rest = [arg for i, arg in enumerate(argv) if not (arg == "--nproc_per_node" or arg.startswith(
        "--nproc_per_node=") or (i > 0 and argv[i - 1] == "--nproc_per_node"))]
    return run_local_ranks(nproc, [sys.executable, "-m", "dpo_ds", *rest])


def run_command(name: str, module, args: argparse.Namespace) -> int:
    """`module.run(args)`, with every way a command can fail turned into one line on stderr and an exit status
    (dpo_ds.errors): here, once, for every command."""
    try:
        with stdout_for_results_only():
            return int(module.run(args) or 0)
    except UsageError as err:  # every rank finds the same bad input: one says it
        report_error(f"dpo-ds {name}: error: {err}", every_rank=False)
        return 2
    except LauncherError as err:  # the rendezvous, directories not shared by every rank, rank 0 lost
        report_error(f"dpo-ds {name}: error: {err}", every_rank=err.every_rank)
        return 1
    except Preempted as stop:
        logging.getLogger("dpo_ds").warning("%s", stop)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to checkpoint yet
        print(f"dpo-ds {name}: interrupted (no checkpoint)", file=sys.stderr, flush=True)
        return 130
    finally:
        _leave_process_group()


def report_error(line: str, every_rank: bool) -> None:
    """The one line a failed command ends with: on stderr from the first rank of the node to fail (or from each
    rank, for an error only that rank may see), and in the error file torchrun's agent reads
    (TORCHELASTIC_ERROR_FILE), so that the agent's failure summary shows this line instead of a traceback."""
    if every_rank or _first_failure_on_node():
        print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))


def _first_failure_on_node() -> bool:
    """Whether this rank is the first of its node to report an error that every rank finds alike (bad input). Not
    simply rank 0: torchrun, mpirun and srun stop the other ranks once one has failed, so rank 0 may be stopped
    before it prints. The first rank creates a marker named after the job (master port) and the process that
    started the node's ranks (torchrun's agent, Open MPI's or Slurm's daemon)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    marker = Path(tempfile.gettempdir()) / f"dpo-ds-error-{os.environ.get('MASTER_PORT', '')}-{os.getppid()}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # no writable temporary directory: better twice than never
        return True
    return True


def _leave_process_group() -> None:
    """Destroy the process group a command joined (torch.distributed is only imported by commands that do)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def entry() -> None:
    """The `dpo-ds` console script and `python -m dpo_ds`."""
    exit_process(main())


if __name__ == "__main__":
    entry()
