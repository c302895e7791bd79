"""Per-rank peak RSS when 2 ranks load a >= 300M-parameter model sharded (ZeRO-3), against its fp32 size.

    DS_ACCELERATOR=cpu python benchmarks/load_memory.py [--cache-dir /tmp] [--loader hf|streamed] [--nproc 2]
                                                        [--family llama|mixtral]

The parent builds (once, cached under CACHE_DIR/dpo-ds-bench-llama-374m) a random-init Llama of ~374M
parameters in fp32 safetensors, with the demo tokenizer (so `benchmarks/convert_memory.py` can train it),
or with `--family mixtral` (CACHE_DIR/dpo-ds-bench-mixtral-375m) a Mixtral of the same width and depth whose
MLPs are 8 experts of width 352 (2 per token): its checkpoint holds per-expert tensors that the loaders
fuse into transformers' 3-D in-memory expert tensors,
then runs this file under `python -m torch.distributed.run --nproc_per_node N --master_addr 127.0.0.1`.
Each rank joins the process group (launcher.dist.init_distributed), imports everything, records its RSS
baseline, loads the model the way the trainer builds the policy, and reports:

- baseline:  VmRSS right before loading (torch, deepspeed, transformers, dpo_ds imported; dist initialised)
- peak:      ru_maxrss (= VmHWM) after loading, i.e. the process's high-water mark
- increment: peak - baseline
- anon/file: peak RssAnon and peak RssFile seen by a 5 ms sampler thread during loading (file-backed
             pages are mmapped safetensors pages: counted in RSS but reclaimable)
- after:     VmRSS once loading is done (what the rank keeps: ~its 1/N partition)

Loaders: `hf` = dpo_ds.engines.load_sharded_model (from_pretrained under HfDeepSpeedConfig, what the trainer
uses); `streamed` = dpo_ds.loading.load_sharded_pretrained (zero.Init + one tensor at a time from rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "dpo-ds-bench-llama-374m"
# hidden 1024, 24 layers, MLP 2816, vocab 32000, untied: 374.4M parameters, 1.50 GB in fp32.
MODEL_CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                    tie_word_embeddings=False, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=3)


# the same, with each MLP split into 8 experts of 352 (8 x 352 = 2816): 374.6M parameters
MIXTRAL_CONFIG = {**MODEL_CONFIG, "intermediate_size": 352, "num_local_experts": 8, "num_experts_per_tok": 2}
FAMILIES = {"llama": (MODEL_NAME, MODEL_CONFIG), "mixtral": ("dpo-ds-bench-mixtral-375m", MIXTRAL_CONFIG)}


def param_count(c: dict) -> int:
    h, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    experts = c.get("num_local_experts", 1)
    router = h * experts if experts > 1 else 0
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i * experts + router + 2 * h  # q,o + k,v + MLP(s) + 2 RMSNorms
    return v * h * (1 if c["tie_word_embeddings"] else 2) + layers * per_layer + h


def ensure_model(cache_dir: str, family: str = "llama") -> Path:
    """Build the benchmark model dir once (config, fp32 safetensors, demo tokenizer); reuse it afterwards."""
    name, config = FAMILIES[family]
    path = Path(cache_dir) / name
    if (path / "config.json").is_file() and list(path.glob("*.safetensors")):
        return path
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_ds.demo_data import _build_tokenizer

    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    _build_tokenizer(str(tmp))  # ids < 512 < vocab_size: the demo data tokenizes into this model's range
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config), dtype=torch.float32)
    # One file (no sharding): the worst case for loaders that read a whole file at once.
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="100GB")
    del model
    os.replace(tmp, path)
    return path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Sampler(threading.Thread):
    """Max RssAnon / RssFile / VmRSS of this process, sampled every `period` seconds."""

    def __init__(self, period: float = 0.005):
        super().__init__(daemon=True)
        self.period, self.stop = period, threading.Event()
        self.max = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}

    def sample(self) -> None:
        for k in self.max:
            self.max[k] = max(self.max[k], _status_kib(k))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(self.period)
        self.sample()


def worker(args) -> None:
    from launcher.dist import init_distributed

    env = init_distributed(timeout_s=600)
    import gc

    import deepspeed
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401

    from dpo_ds.config import TrainConfig
    from dpo_ds.engines import load_sharded_model, resolve_policy_config
    from dpo_ds.families import load_model_config

    cfg = TrainConfig(model_name_or_path=args.model, train_file="unused.jsonl", precision="fp32")
    hidden = load_model_config(cfg.model_name_or_path, False).hidden_size
    ds_config = resolve_policy_config(cfg, env.world_size, hidden)
    if args.loader == "hf":
        load = load_sharded_model
    else:
        from dpo_ds.loading import load_sharded_pretrained as load
    gc.collect()
    dist.barrier()
    baseline = _status_kib("VmRSS")
    hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = Sampler()
    sampler.start()
    started = time.perf_counter()
    model = load(cfg.model_name_or_path, ds_config, torch.float32, False)
    seconds = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    local = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    gc.collect()
    after = _status_kib("VmRSS")
    row = {"rank": env.rank, "loader": args.loader, "seconds": round(seconds, 1), "baseline_kib": baseline,
           "hwm_before_load_kib": hwm_before, "peak_kib": peak, "vmhwm_kib": _status_kib("VmHWM"),
           "peak_anon_kib": sampler.max["RssAnon"], "peak_file_kib": sampler.max["RssFile"],
           "after_kib": after, "params": total, "local_partition_numel": local,
           "deepspeed": deepspeed.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    rows = [None] * env.world_size
    dist.all_gather_object(rows, row)
    if env.rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def report(rows: list[dict], n_params: int) -> str:
    fp32 = n_params * 4
    gib = lambda kib: kib / 2**20  # noqa: E731
    lines = [f"model: {n_params:,} parameters, fp32 size {fp32 / 2**30:.3f} GiB ({fp32 / 1e9:.3f} GB); "
             f"loader {rows[0]['loader']}; load time {', '.join(str(r['seconds']) for r in rows)} s",
             "| rank | baseline GiB | peak GiB | increment GiB | increment / fp32 | peak / fp32 | peak RssAnon GiB "
             "| peak RssFile GiB | after load GiB | meets <= 0.6x (increment) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        inc = (r["peak_kib"] - r["baseline_kib"]) * 1024
        lines.append(f"| {r['rank']} | {gib(r['baseline_kib']):.3f} | {gib(r['peak_kib']):.3f} | {inc / 2**30:.3f} "
                     f"| {inc / fp32:.2f} | {r['peak_kib'] * 1024 / fp32:.2f} | {gib(r['peak_anon_kib']):.3f} "
                     f"| {gib(r['peak_file_kib']):.3f} | {gib(r['after_kib']):.3f} "
                     f"| {'yes' if inc / fp32 <= 0.6 else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default="/tmp")
    p.add_argument("--loader", choices=("hf", "streamed"), default="hf")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    if args.worker:
        worker(args)
        return
    # Build the model in a child so this parent (which waits for the ranks) stays small.
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                    "from benchmarks.load_memory import ensure_model; print(ensure_model(sys.argv[2], sys.argv[3]))",
                    str(REPO), args.cache_dir, args.family], check=True, cwd=REPO)
    name, config = FAMILIES[args.family]
    model = Path(args.cache_dir) / name
    n = param_count(config)
    print(f"N = {n:,} parameters; fp32 size = {n * 4 / 2**30:.3f} GiB", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--master_addr=127.0.0.1",
           f"--master_port={args.port}", str(Path(__file__).resolve()), "--worker", "--loader", args.loader,
           "--model", str(model)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not result:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    rows = json.loads(result[-1][len("RESULT "):])
    assert rows[0]["params"] == n, (rows[0]["params"], n)
    print(report(rows, n))
    print("RAW " + json.dumps(rows))


if __name__ == "__main__":
    main()
