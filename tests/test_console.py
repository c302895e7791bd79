"""What a run shows on the console (issue 25 items 5 and 8): a bar on a terminal with the loss in significant
digits; in a log file (no terminal) one plain line per logged step, and a window that covers another number of
steps than logging_steps says so."""
from __future__ import annotations

import io
import logging

from dpo_ds.console import Progress

METRICS = {"loss": 0.5, "rewards/accuracies": 0.75, "tokens_per_s": 1234.4}


def test_without_a_terminal_each_logged_step_is_one_plain_line(caplog):
    progress = Progress(total=30, start=9, enabled=True)  # resumed after step 9
    assert progress.bar is None  # pytest's stderr is not a terminal
    with caplog.at_level(logging.INFO, logger="dpo_ds"):
        for done in range(10, 31):
            progress.step_done(METRICS["loss"])
            if done % 10 == 0:
                progress.logged(done, METRICS, window_steps=1 if done == 10 else 10, logging_steps=10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("\r" not in line for line in lines)
    assert lines[0].startswith("step 10/30 | loss 0.5 | accuracy 0.750 | 1234 tokens/s | ETA ")
    assert lines[0].endswith(" | covers 1 step")  # the partial window after the resume
    assert "covers" not in lines[1] and lines[2].split("ETA ")[1] == "0:00:00"


def test_rank_without_progress_prints_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="dpo_ds"):
        Progress(total=10, start=0, enabled=False).logged(10, METRICS, 10, 10)
    assert caplog.records == []


def test_the_bar_shows_a_small_loss_in_significant_digits(monkeypatch):
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr("sys.stderr", terminal)
    progress = Progress(total=3, start=0, enabled=True)
    progress.step_done(3.9e-06)
    progress.close()
    assert "loss=3.9e-06" in terminal.getvalue() and "loss=0.0000" not in terminal.getvalue()
