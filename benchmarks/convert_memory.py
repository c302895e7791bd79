"""Peak RSS of `dpo-ds convert` on a checkpoint of a >= 1 GB (fp32) model, against the model's fp32 size.

    DS_ACCELERATOR=cpu python benchmarks/convert_memory.py [--cache-dir /tmp] [--nproc 2] [--max_shard_size 200MB]

1. Model: the ~374M-parameter Llama of benchmarks/load_memory.py (1.50 GB fp32, demo tokenizer), built once.
2. Checkpoint: a real dpo-ds checkpoint from `python -m torch.distributed.run --nproc_per_node N
   --master_addr 127.0.0.1 -m dpo_ds train` with max_steps 1, save_steps 1, precision fp32, micro batch 1,
   8 demo pairs, reference_free (no reference engine: the checkpoint layout is the same). Built once, under
   CACHE_DIR/dpo-ds-bench-convert/run/checkpoints/step-00000001.
3. `python -m dpo_ds convert CKPT OUT --dtype fp32 --max_shard_size 200MB` runs as a child; its peak RSS is
   ru_maxrss from wait4 (what `/usr/bin/time -v` reports as "Maximum resident set size"), and a 10 ms
   sampler of /proc/PID/status records peak VmRSS, RssAnon (heap) and RssFile (mapped file pages:
   counted in RSS, but clean and reclaimable by the kernel at any time).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.load_memory import MODEL_CONFIG, MODEL_NAME, param_count  # noqa: E402

WORK = "dpo-ds-bench-convert"


def ensure_checkpoint(cache_dir: Path, nproc: int, port: int) -> Path:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", "from benchmarks.load_memory import ensure_model; import sys; "
                    "print(ensure_model(sys.argv[1]))", str(cache_dir)], check=True, cwd=REPO, env=env)
    work = cache_dir / WORK
    ckpt = work / "run" / "checkpoints" / "step-00000001"
    if ckpt.is_dir():
        return ckpt
    import yaml

    from dpo_ds.demo_data import make_pairs

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with open(work / "train.jsonl", "w") as fh:
        for row in make_pairs(8, 0, "train"):
            fh.write(json.dumps(row) + "\n")
    config = {"model_name_or_path": str(cache_dir / MODEL_NAME), "train_file": str(work / "train.jsonl"),
              "output_dir": str(work / "run"), "max_steps": 1, "save_steps": 1, "logging_steps": 1,
              "precision": "fp32", "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 64,
              "reference_free": True, "learning_rate": 1e-6}
    (work / "train.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "dpo_ds", "train", "--config", str(work / "train.yaml")]
    print("$ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    print(f"training + checkpoint + final export: {time.perf_counter() - started:.0f} s", flush=True)
    shutil.rmtree(work / "run" / "final", ignore_errors=True)  # not needed here; 1.5 GB
    return ckpt


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


def measure(cmd: list[str], env: dict) -> dict:
    """Run `cmd`, sample its /proc status every 10 ms, return peaks (KiB) and ru_maxrss."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                for k, v in _status(proc.pid).items():
                    peaks[k] = max(peaks[k], v)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    output = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-6000:]}")
    return {"ru_maxrss_kib": rusage.ru_maxrss, "seconds": round(time.perf_counter() - started, 1),
            **{f"peak_{k}_kib": v for k, v in peaks.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default="/tmp")
    p.add_argument("--nproc", type=int, default=2, help="ranks of the training run that writes the checkpoint")
    p.add_argument("--port", type=int, default=29527)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--max_shard_size", default="200MB")
    args = p.parse_args()
    cache = Path(args.cache_dir)
    ckpt = ensure_checkpoint(cache, args.nproc, args.port)
    out = cache / WORK / "hf"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "MASTER_ADDR": "127.0.0.1"}
    # the interpreter + imports alone, for reference
    base = measure([sys.executable, "-c", "import torch, deepspeed, transformers, safetensors; "
                    "import dpo_ds.convert, deepspeed.utils.zero_to_fp32"], env)
    cmd = [sys.executable, "-m", "dpo_ds", "convert", str(ckpt), str(out), "--dtype", args.dtype,
           "--max_shard_size", args.max_shard_size]
    print("$ " + " ".join(cmd), flush=True)
    r = measure(cmd, env)
    n = param_count(MODEL_CONFIG)
    fp32 = n * 4
    gib = lambda kib: kib / 2**20  # noqa: E731
    ckpt_bytes = sum(f.stat().st_size for f in (ckpt / "ds").rglob("*") if f.is_file())
    print(f"model: {n:,} parameters, fp32 {fp32 / 2**30:.3f} GiB ({fp32 / 1e9:.3f} GB); checkpoint ds/ "
          f"{ckpt_bytes / 2**30:.2f} GiB on disk ({args.nproc} ranks); convert took {r['seconds']} s")
    print("| process | peak RSS (ru_maxrss) GiB | peak / fp32 | peak RssAnon GiB | anon / fp32 | peak RssFile GiB "
          "| meets <= 0.5x (peak RSS) |")
    print("|---|---|---|---|---|---|---|")
    for name, m in (("imports only", base), ("dpo-ds convert", r)):
        peak = m["ru_maxrss_kib"] * 1024
        print(f"| {name} | {gib(m['ru_maxrss_kib']):.3f} | {peak / fp32:.2f} | {gib(m['peak_RssAnon_kib']):.3f} "
              f"| {m['peak_RssAnon_kib'] * 1024 / fp32:.2f} | {gib(m['peak_RssFile_kib']):.3f} "
              f"| {'yes' if peak / fp32 <= 0.5 else 'NO'} |")
    print("RAW " + json.dumps({"imports": base, "convert": r, "params": n, "ckpt_bytes": ckpt_bytes}))


if __name__ == "__main__":
    main()
