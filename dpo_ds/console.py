"""What a command shows: its result alone on stdout (`emit`), everything else on stderr (the log format of
`setup_logging`)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time

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


class Progress:
    """What the user sees of a run's steps on rank 0: a bar on a terminal; where stderr is not a terminal (every Slurm
    log) no bar, whose carriage returns would make one endless line, but one plain line per logged step."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.started = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="dpo", dynamic_ncols=True, file=sys.stderr)

    def step_done(self, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4g}")  # significant digits: a loss of 4e-6 is not 0.0000

    def logged(self, done: int, metrics: dict[str, float], window_steps: int, logging_steps: int) -> None:
        """The line of a logged step (without a bar): step, loss, accuracy, tokens/s, ETA; a window of another
        length than logging_steps (the first after a resume, the last of the run) says how many steps it covers."""
        if not self.enabled or self.bar is not None:
            return
        elapsed, steps = time.monotonic() - self.started, done - self.start
        eta = elapsed / steps * (self.total - done) if steps else 0.0
        covers = f" | covers {window_steps} step{'s' * (window_steps != 1)}" if window_steps != logging_steps else ""
        logging.getLogger("dpo_ds").info(
            "step %d/%d | loss %.4g | accuracy %.3f | %.0f tokens/s | ETA %s%s", done, self.total, metrics["loss"],
            metrics["rewards/accuracies"], metrics["tokens_per_s"], _duration(eta), covers)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
