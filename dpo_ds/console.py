"""What a command shows: its result alone on stdout (`emit`), everything else on stderr (the log format of
`setup_logging`)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

_results = sys.stdout


def emit(text: str) -> None:
    """Write a command's result (JSON, a table) to stdout. Everything else written to stdout while a command
    runs (DeepSpeed prints its op build messages there, some from C++) goes to stderr, so that
    `dpo-ds eval ... | jq` reads only the result."""
    print(text, file=_results, flush=True)


@contextlib.contextmanager
def stdout_for_results_only():
    global _results
    real_stdout = sys.stdout
    real_stdout.flush()
    try:
        is_fd1 = real_stdout.fileno() == 1
    except (AttributeError, OSError, io.UnsupportedOperation):  # replaced (pytest's capsys): results go there
        is_fd1 = False
    saved_fd = os.dup(1)
    _results = os.fdopen(os.dup(saved_fd), "w") if is_fd1 else real_stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        sys.stdout = real_stdout
        if is_fd1:
            _results.close()
        _results = real_stdout


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only on the others, each line tagged with its rank; the libraries' chatter off."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
