"""Stop signals: a job told to stop (Slurm's preemption or time limit, Ctrl-C) checkpoints at the next step boundary
and exits 75, so the scheduler requeues it and `--resume_from auto` continues."""
from __future__ import annotations

import logging
import os
import signal
import time

logger = logging.getLogger("dpo_ds")


class StopSignal:
    """Remembers SIGTERM/SIGUSR1/SIGINT so the trainer can checkpoint at the next step boundary and exit.

    Ctrl-C (SIGINT) does the same; a second one aborts at once, without a checkpoint. A SIGINT within
    REPEAT_WINDOW_S of the first is the same Ctrl-C: the terminal sends it to torchrun's workers and torchrun
    forwards its own copy to them."""
    REPEAT_WINDOW_S = 2.0

    def __init__(self):
        self.received: int | None = None
        self._interrupted_at: float | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is not None:
                if now - self._interrupted_at > self.REPEAT_WINDOW_S:
                    os.write(2, b"second interrupt: stopping now, without a checkpoint\n")
                    os._exit(130)
                return
            self._interrupted_at = now
        self.received = signum
        # what happens next is said where it happens (TrainingLoop): a signal during start-up, the export, or a
        # torchrun teardown after another rank died is followed by no step and no checkpoint
        logger.warning("received %s%s", signal.Signals(signum).name,
                       " (Ctrl-C again to stop at once, without a checkpoint)" if signum == signal.SIGINT else "")
