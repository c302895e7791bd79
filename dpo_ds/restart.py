"""Should slurm/dpo.sbatch requeue a job whose training step failed (a rank died, a node crashed)?

    python -m dpo_ds.restart --since EPOCH --restarts N --max_restarts M [--backoff_s S] \\
        --config CONFIG.yaml [--field value ...]

Yes (exit 0, the seconds to wait before requeueing on stdout) only when the run made progress since this
start of the job (a checkpoint published after EPOCH, so a failure that recurs at start-up cannot loop) and
fewer than M automatic restarts happened so far; the wait doubles with every restart (S, 2S, 4S, ...). No:
exit 1 with the reason on stderr. Only output_dir is read (`--output_dir`, else the YAML's, else the
default); the trainer's other flags are ignored.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dpo_ds.checkpoint import CHECKPOINTS_DIR, LATEST, MANIFEST
from dpo_ds.config import FIELDS


class NoRestart(Exception):
    """Why the job is not requeued."""


def newest_checkpoint_time(output_dir: str) -> float | None:
    """When the checkpoint `latest` names was published (its manifest is written last), None without one."""
    latest = Path(output_dir) / CHECKPOINTS_DIR / LATEST
    if not latest.is_file():
        return None
    manifest = latest.parent / latest.read_text().strip() / MANIFEST
    return manifest.stat().st_mtime if manifest.is_file() else None


def restart_delay(output_dir: str, since: float, restarts: int, max_restarts: int, backoff_s: float) -> float:
    """Seconds to wait before requeueing; raises NoRestart with the reason when the job should stay ended."""
    if restarts >= max_restarts:
        raise NoRestart(f"already restarted {restarts} time(s) after a failure (RESTART_ON_FAILURE={max_restarts})")
    published = newest_checkpoint_time(output_dir)
    if published is None or published <= since:
        raise NoRestart(f"no checkpoint in {Path(output_dir) / CHECKPOINTS_DIR} was written since this start of the "
                        f"job: restarting would fail again at the same point")
    return backoff_s * 2 ** restarts


def run_output_dir(config: str | None) -> str:
    values = (yaml.safe_load(Path(config).read_text()) or {}) if config else {}
    return str(values.get("output_dir") or FIELDS["output_dir"].default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_ds.restart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--since", type=float, required=True, help="when this start of the job began (Unix time)")
    parser.add_argument("--restarts", type=int, required=True, help="automatic restarts after failures so far")
    parser.add_argument("--max_restarts", type=int, required=True, help="the most automatic restarts allowed")
    parser.add_argument("--backoff_s", type=float, default=60.0, help="wait before the first restart (doubles)")
    parser.add_argument("--config", help="the run's YAML config")
    parser.add_argument("--output_dir", help="overrides the YAML's output_dir, as in `dpo-ds train`")
    args, _ = parser.parse_known_args(argv)
    try:
        output_dir = args.output_dir or run_output_dir(args.config)
        delay = restart_delay(output_dir, args.since, args.restarts, args.max_restarts, args.backoff_s)
    except (NoRestart, OSError, yaml.YAMLError) as reason:
        print(f"dpo-ds restart: not restarting: {reason}", file=sys.stderr)
        return 1
    print(f"{delay:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
