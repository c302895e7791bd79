"""The run folder's guard: a run's outputs are never replaced unless asked, and a finished run says so.

`train` checks the folder before it loads anything (`check_output_dir`), clears it only once every other
check has passed (`clear_for_overwrite`), and marks the run finished once `final/` is published
(`mark_finished`), so a run without checkpoints (save_steps 0) still leaves a record that it ended.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from dpo_ds.checkpoint import CHECKPOINTS_DIR, CheckpointError

logger = logging.getLogger("dpo_ds")

FINISHED = "run_finished.json"
# What a run writes into its folder (caches/ is not one: it is shared by fingerprint and reused on purpose).
RUN_OUTPUTS = ("final", "final_adapter", "run_config.json", "metrics.jsonl", "tensorboard", CHECKPOINTS_DIR, FINISHED)


class RunFinished(Exception):
    """`resume_from: auto` in a folder whose run finished: nothing to do (exit 0); the message says so."""


def run_outputs(output_dir: str) -> list[str]:
    """The names of RUN_OUTPUTS present in `output_dir`, directories with a trailing slash."""
    out = Path(output_dir)
    return [name + ("/" if (out / name).is_dir() else "") for name in RUN_OUTPUTS if (out / name).exists()]


def finished_record(output_dir: str) -> dict | None:
    """What `mark_finished` recorded (steps, time), or None when the run has not finished."""
    path = Path(output_dir) / FINISHED
    return json.loads(path.read_text()) if path.is_file() else None


def check_output_dir(output_dir: str, resume_from: str | None, overwrite: bool) -> None:
    """Refuse a start that would replace a run's outputs (unless `overwrite`); raise RunFinished for
    `resume_from: auto` on a finished run. Reads only; every rank calls it and decides alike (one shared
    folder)."""
    present = run_outputs(output_dir)
    if not present or overwrite:
        return
    finished = finished_record(output_dir)
    if finished is not None:
        what = f"{output_dir} holds a finished run ({finished['steps']} steps, finished {finished['finished_at']})"
        if resume_from == "auto":
            raise RunFinished(f"{what}: nothing to do (with --overwrite true it trains again, from its last "
                              f"checkpoint if it has one, and exports final/ again)")
        raise CheckpointError(f"{what}: choose another output_dir, or pass --overwrite true to replace "
                              f"{', '.join(present)}")
    if resume_from is None:
        raise CheckpointError(f"{output_dir} already holds a run's outputs ({', '.join(present)}): pass "
                              f"--resume_from auto to continue it, --overwrite true to replace them, or choose "
                              f"another output_dir")


def clear_for_overwrite(output_dir: str, resume_from: str | None, overwrite: bool) -> None:
    """Rank 0, once every check has passed: under `overwrite`, a fresh start removes the previous run's
    outputs (a resumed one keeps its checkpoints and metrics up to the resumed step) and the finished mark
    goes, so a run stopped again is not taken for finished. Logs what it replaces."""
    present = run_outputs(output_dir)
    if not overwrite or not present:
        return
    out = Path(output_dir)
    if resume_from is None:
        logger.warning("--overwrite true: removing the previous run's %s from %s", ", ".join(present), output_dir)
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    else:
        replaced = [name for name in present if name.rstrip("/") in ("final", "final_adapter", "run_config.json")]
        logger.warning("--overwrite true: continuing the run in %s; its %s will be replaced", output_dir,
                       ", ".join(replaced) or "outputs")
        (out / FINISHED).unlink(missing_ok=True)


def mark_finished(output_dir: str, steps: int) -> None:
    """Rank 0, after final/ is published: the record `check_output_dir` reads."""
    path = Path(output_dir) / FINISHED
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"steps": steps, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
    os.replace(tmp, path)
