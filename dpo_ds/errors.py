"""What a dpo-ds command can end with, other than success; `dpo_ds.cli` turns each into one line and an exit status.

- `UsageError` and its kinds (ConfigError, DataError, CheckpointError, LoadError, ExportError, TrainingStopped):
  bad input or a refused run, already phrased for the user (file, line, field, what to do): exit 2.
- `Preempted`: a stop signal arrived and the checkpoint is written: exit 75 (EX_TEMPFAIL), so the scheduler
  requeues the job.
"""
from __future__ import annotations

EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; the scheduler should requeue


class UsageError(Exception):
    """Bad input or a refused run, phrased for the user: `dpo-ds COMMAND: error: <message>`, exit 2."""


def describe_error(err: BaseException) -> str:
    """'<path>: <reason>' for a file system error (as in `dpo-ds train: error: <path>: No space left on
    device`), the error's own text otherwise."""
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err)


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that cannot be written, found, verified, converted or resumed (dpo_ds.checkpoint)."""


class Preempted(Exception):
    """A stop signal arrived; the checkpoint is written and the process exits with EXIT_PREEMPTED."""
