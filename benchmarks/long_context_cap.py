"""The longest pair that trains within a per-rank memory cap, at S = 1 and S = 2 (issue 21; BENCHMARKS.md
section 13).

    python benchmarks/long_context_cap.py --cap_gib 1.25 [--sizes 1 2] [--tiled_mlp] [--start 1024]
        [--limit 65536] [--tolerance 0.05] [--results DIR]

For each S in --sizes, S ranks on this machine (one sequence-parallel group) run one DPO training step of
`dpo-ds bench` (the trainer's step: live reference, gradient checkpointing, fused lm_head, fp32; with
--tiled_mlp, tiled MLPs) on one pair of two sequences of L tokens each, for a Llama of 32k vocabulary
(benchmarks/configs/llama-32k-vocab). A run fits when every rank's peak RSS (VmHWM, what `dpo-ds bench`
reports as peak memory on CPU) stays under the cap; the ranks are watched every 0.1 s and stopped as soon as one
crosses it, so a length that does not fit costs only the step up to that point. First a 64-token pair gives
the process's baseline (libraries, model and optimizer states). Then L doubles from --start until a
run does not fit, then the last L that fit and the first that did not are bisected until they are within
--tolerance (5%) of each other (L in multiples of 64). The environment is passed on to the ranks as it is:
set the allocator there (MALLOC_MMAP_THRESHOLD_=1048576, GLIBC_TUNABLES, LD_PRELOAD), the results record it.

Prints one JSON line per run and a summary line per S; writes both to DIR/cap_<cap>.jsonl (default DIR:
benchmarks/results/long_context).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from launcher.env import free_port  # noqa: E402  (the repository's own launcher helpers; no dpo_ds import)
from launcher.local import rank_environ  # noqa: E402

MODEL = "benchmarks/configs/llama-32k-vocab/config.json"
ALLOCATOR_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES",
                  "LD_PRELOAD")
STEP = 64  # lengths are multiples of this


def peak_rss_gib(pid: int) -> float:
    """A live process's resident-set high-water mark (VmHWM), GiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return 0.0


def run_step(size: int, length: int, cap_gib: float, tiled_mlp: bool, work: Path) -> dict:
    """One `dpo-ds bench` step on S = `size` ranks at a pair of two `length`-token sequences; stopped when a
    rank's peak RSS crosses `cap_gib`. Returns the run's record (fits, peak, step time)."""
    command = [sys.executable, "-m", "dpo_ds", "bench", "--model", MODEL, "--lengths", f"fixed:{length}",
               "--max_length", str(length), "--precision", "fp32", "--warmup", "0", "--steps", "1", "--json",
               "--output_dir", str(work / "bench"), "--sequence_parallel_size", str(size),
               *(["--tiled_mlp", "true"] if tiled_mlp else [])]
    port = free_port()
    logs = [work / f"s{size}_len{length}.rank{rank}.log" for rank in range(size)]
    output = work / f"s{size}_len{length}.json"
    streams = [open(output if rank == 0 else log, "w") for rank, log in enumerate(logs)]  # rank 0's JSON line
    errors = [open(log, "a") for log in logs]
    # threads per rank as torchrun sets them (one core each when several ranks share the machine), unless given
    environ = {"OMP_NUM_THREADS": str(max(1, os.cpu_count() // size)), **os.environ}
    ranks = [subprocess.Popen(command, cwd=ROOT, env=rank_environ(environ, rank, size, port),
                              stdout=streams[rank], stderr=errors[rank]) for rank in range(size)]
    started, peak, stopped = time.monotonic(), 0.0, False
    while any(proc.poll() is None for proc in ranks):
        peak = max(peak, *(peak_rss_gib(proc.pid) for proc in ranks))
        if peak > cap_gib and not stopped:
            stopped = True
            for proc in ranks:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
        time.sleep(0.1)
    for stream in streams + errors:
        stream.close()
    # DeepSpeed's CPU all-reduce segments (deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, 66 MiB each)
    # outlive the ranks: remove this run's
    for segment in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"):
        segment.unlink(missing_ok=True)
    record = dict(ranks=size, length=length, pair_tokens=2 * length, tiled_mlp=tiled_mlp,
                  wall_s=round(time.monotonic() - started, 1))
    if stopped:
        return {**record, "fits": False, "stopped_at_gib": round(peak, 3)}
    if any(proc.returncode for proc in ranks):
        tails = "".join(log.read_text()[-2000:] for log in logs)
        raise RuntimeError(f"S={size} length {length}: a rank failed (exit {[p.returncode for p in ranks]}):\n{tails}")
    report = json.loads(output.read_text().strip().splitlines()[-1])
    gib = report["peak_memory_gib"]  # the largest over the ranks
    return {**record, "fits": gib <= cap_gib, "peak_gib": round(gib, 3),
            "step_s": round(report["step_time_s"]["median"], 1)}


def longest(size: int, cap_gib: float, start: int, limit: int, tolerance: float, tiled_mlp: bool, work: Path,
            log) -> dict:
    """Doubling from `start` (up to `limit`), then bisection to `tolerance`: the longest L that fits."""
    def fits(length: int) -> bool:
        record = run_step(size, length, cap_gib, tiled_mlp, work)
        log(record)
        return record["fits"]

    baseline = run_step(size, STEP, cap_gib, tiled_mlp, work)  # also writes the random-init model once
    log({"baseline": True, **baseline})
    good, bad, length = 0, None, start
    while length <= limit:
        if not fits(length):
            bad = length
            break
        good, length = length, 2 * length
    while bad is not None and good and bad - good > max(STEP, tolerance * good):
        middle = (good + bad) // 2 // STEP * STEP
        if fits(middle):
            good = middle
        else:
            bad = middle
    return dict(ranks=size, cap_gib=cap_gib, tiled_mlp=tiled_mlp, baseline_gib=baseline.get("peak_gib"),
                longest_length=good, longest_pair_tokens=2 * good,
                first_over_cap_length=bad, limit_reached=bad is None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cap_gib", type=float, required=True, help="Per-rank peak RSS cap, GiB.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="Values of S (ranks = S).")
    parser.add_argument("--tiled_mlp", action="store_true", help="Train with tiled_mlp: true.")
    parser.add_argument("--start", type=int, default=1024, help="First sequence length L (tokens).")
    parser.add_argument("--limit", type=int, default=65536, help="Longest L tried.")
    parser.add_argument("--tolerance", type=float, default=0.05, help="Bisect until within this fraction.")
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/long_context"))
    args = parser.parse_args()
    if args.start % STEP:
        parser.error(f"--start must be a multiple of {STEP}")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"dpo-ds-cap-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    out = results / f"cap_{args.cap_gib:g}{'_tiled' if args.tiled_mlp else ''}.jsonl"
    with open(out, "w") as sink:
        def log(record: dict) -> None:
            line = json.dumps(record)
            print(line, flush=True)
            sink.write(line + "\n")
            sink.flush()

        log(dict(command=" ".join(sys.argv), allocator={k: os.environ[k] for k in ALLOCATOR_VARS if k in os.environ},
                 date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), load_average=os.getloadavg()))
        summaries = [longest(size, args.cap_gib, args.start, args.limit, args.tolerance, args.tiled_mlp, work, log)
                     for size in args.sizes]
        for summary in summaries:
            log({"summary": True, **summary})
        if len(summaries) == 2 and summaries[0]["longest_length"]:
            log({"summary": True, "ratio": round(summaries[1]["longest_length"] / summaries[0]["longest_length"], 2),
                 "sizes": args.sizes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
