"""The data path at scale (issue 10): time to the end of step 1, summed PSS of all processes, and
`dpo-ds prepare` throughput, on real text with a 32k byte-level BPE tokenizer.

    python benchmarks/data_scale.py assets DIR                       # tokenizer (32k BPE) + tiny Llama in DIR
    python benchmarks/data_scale.py pairs DIR N [--words W]          # DIR/pairs-N.jsonl, ~590 stored tokens per pair
    python benchmarks/data_scale.py train DIR N [--dist_timeout_s 60] [--nproc 2] [--cache_dir CACHE] [--words W]
    python benchmarks/data_scale.py prepare DIR N [--workers K] [--words W]
    python benchmarks/data_scale.py memory DIR N --cache_dir CACHE [--words W]   # one rank's PSS for the data

Pairs are Zipf-distributed pseudo-words (natural-text frequencies); --words sets the words per prompt and
per completion (190: ~590 stored tokens per pair, 19: ~60).

`train` starts a fresh 2-rank `torchrun -m dpo_ds train` (new cache_dir: it prepares the data first) with a tiny
model, so the time is the data path's, samples the summed PSS of torchrun and all its descendants (ranks and
tokenizer processes) every 0.25 s until the log says step 1 is done, and prints one JSON line. `prepare`
runs `dpo-ds prepare` in a fresh cache_dir and prints its wall time and pairs/s as JSON; `train --cache_dir`
then starts from that cache.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's dpo_ds, also for `memory`
WORDS = 190  # words in each of prompt, chosen, rejected: ~590 stored tokens per pair with this vocabulary


def words(seed: int = 0, n: int = 20000) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7))) for _ in range(n)]


def text_sampler(vocab: list[str], seed: int):
    """k words drawn with Zipf frequencies (word r has weight 1/r), as in natural text."""
    rng = random.Random(seed)
    cum, total = [], 0.0
    for r in range(1, len(vocab) + 1):
        total += 1.0 / r
        cum.append(total)
    return lambda k: " ".join(rng.choices(vocab, cum_weights=cum, k=k))


def build_assets(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    sample = text_sampler(words(), 1)
    corpus = (sample(100) for _ in range(20000))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=32000, special_tokens=["<s>", "</s>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out / "model")
    cfg = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                               bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out / "model")
    print(json.dumps({"assets": str(out / "model"), "vocab": len(fast)}))


def write_pairs(out: Path, n: int, words_per_field: int = WORDS) -> Path:
    path = out / (f"pairs-{n}.jsonl" if words_per_field == WORDS else f"pairs-{n}-w{words_per_field}.jsonl")
    if path.is_file():
        return path
    sample = text_sampler(words(), n)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for _ in range(n):
            prompt = "Question: " + sample(words_per_field) + " Answer:"
            chosen, rejected = " " + sample(words_per_field), " " + sample(words_per_field)
            fh.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    tmp.rename(path)
    return path


def tree_pss(root) -> int:
    import psutil

    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def ops_env(out: Path) -> dict[str, str]:
    """The environment of timed runs: DeepSpeed's CPU ops in OUT/torch_extensions, which nothing else touches.

    Every rank loads DeepSpeed's shm-comm op at start. In a TORCH_EXTENSIONS_DIR shared with other checkouts it
    is stale whenever one of them built it last (their paths rewrite its build.ninja), and a rank compiles it, or
    waits on another process's compile, for minutes: a 1M-pair run at load 4-8 spent ~150 s of its 254 s to step
    1 that way (py-spy: FileBaton.wait under build_shm_op), and the compilers' memory entered its summed PSS.
    Not the data path, so built once, untimed (build_deepspeed_ops), in a directory of the benchmark's own."""
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions")}


def build_deepspeed_ops(out: Path) -> float:
    """Build (or find up to date) DeepSpeed's CPU shm-comm op before a timed run; the seconds it took."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"], cwd=REPO,
                   env=ops_env(out), check=True, capture_output=True)
    return round(time.perf_counter() - started, 1)


def run_train(out: Path, n: int, dist_timeout_s: float, nproc: int, cache_dir: str | None, words: int) -> dict:
    import psutil

    data = write_pairs(out, n, words)
    run_dir = out / f"run-{n}-{int(time.time())}"
    log_path = run_dir.with_suffix(".log")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           "--master_port=29731", "-m", "dpo_ds", "train", "--model_name_or_path", str(out / "model"),
           "--train_file", str(data), "--output_dir", str(run_dir), "--precision", "fp32", "--max_steps", "1",
           "--max_length", "1024", "--micro_batch_size", "1", "--logging_steps", "1",
           "--dist_timeout_s", str(dist_timeout_s)] + (["--cache_dir", cache_dir] if cache_dir else [])
    ops_s = build_deepspeed_ops(out)
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ops_env(out), stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peak, step1, next_pss = 0, None, 0.0
        while proc.poll() is None:
            if time.perf_counter() >= next_pss:  # ~4 ms of CPU per process: once a second, not at every poll
                peak, next_pss = max(peak, tree_pss(root)), time.perf_counter() + 1.0
            if step1 is None and "step 1 done" in log_path.read_text(errors="replace"):
                step1 = time.perf_counter() - started
            time.sleep(0.25)
    text = log_path.read_text(errors="replace")
    prepared = re.search(r"prepared (\d+) pairs \((\d+) tokens\) in ([\d.]+) s \((\d+) pairs/s\)", text)
    return {"pairs": n, "words_per_field": words, "ranks": nproc, "dist_timeout_s": dist_timeout_s, "exit": proc.returncode,
            "cache": "reused " + cache_dir if cache_dir and not prepared else "prepared by the run", "ops_build_s": ops_s,
            "time_to_step1_s": round(step1, 1) if step1 else None, "peak_pss_gib": round(peak / 2**30, 3),
            "stored_tokens": int(prepared[2]) if prepared else None,
            "prepare_s": float(prepared[3]) if prepared else None, "log": str(log_path)}


def run_prepare(out: Path, n: int, workers: int, words: int) -> dict:
    data = write_pairs(out, n, words)
    cache = out / f"cache-prepare-{n}-{workers}-{int(time.time())}"
    cmd = [sys.executable, "-m", "dpo_ds", "prepare", "--model_name_or_path", str(out / "model"),
           "--train_file", str(data), "--max_length", "1024", "--cache_dir", str(cache),
           "--prepare_workers", str(workers)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    prepared = re.search(r"prepared (\d+) pairs \((\d+) tokens\) in ([\d.]+) s \((\d+) pairs/s\)", proc.stderr)
    return {"pairs": n, "words_per_field": words, "workers": workers, "exit": proc.returncode, "wall_s": round(wall, 1),
            "prepare_s": float(prepared[3]) if prepared else None, "pairs_per_s": int(prepared[4]) if prepared else None,
            "stored_tokens": int(prepared[2]) if prepared else None, "cache": str(cache),
            "stderr_tail": proc.stderr[-400:] if proc.returncode else ""}


def rank_memory(out: Path, n: int, cache_dir: str, words: int) -> dict:
    """PSS of this process before and after what one rank does with the data: load the prepared cache, build
    the sampler, cut step 0's micro-batches and collate one."""
    import psutil
    from transformers import AutoTokenizer

    from dpo_ds import data as D
    from dpo_ds.config import TrainConfig

    me = psutil.Process()
    tok = AutoTokenizer.from_pretrained(out / "model")
    before = me.memory_full_info().pss
    pairs, _ = D.load_pairs(str(write_pairs(out, n, words)), tok, max_length=1024, max_prompt_length=None,
                            skip_bad_rows=False, cache_dir=cache_dir)
    sampler = D.PairSampler.for_config(TrainConfig(micro_batch_size=1), pairs, 2)
    D.collate(pairs, sampler.micro_batches(0, 0)[0], 0)
    after = me.memory_full_info().pss
    return {"pairs": n, "words_per_field": words, "stored_tokens": pairs.stored_tokens,
            "rank_pss_delta_mib": round((after - before) / 2**20, 1),
            "bytes_per_stored_token": round((after - before) / pairs.stored_tokens, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["assets", "pairs", "train", "prepare", "memory"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("n", type=int, nargs="?", default=200)
    ap.add_argument("--dist_timeout_s", type=float, default=60)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--words", type=int, default=WORDS, help=f"words per prompt/completion (default {WORDS}: ~590 "
                    "stored tokens per pair; 19: ~60)")
    ap.add_argument("--cache_dir", help="train: use this cache_dir (e.g. one `prepare` filled) instead of a fresh one")
    a = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if a.what == "assets":
        build_assets(a.dir)
    elif a.what == "pairs":
        print(write_pairs(a.dir, a.n, a.words))
    elif a.what == "train":
        print(json.dumps(run_train(a.dir, a.n, a.dist_timeout_s, a.nproc, a.cache_dir, a.words)), flush=True)
    elif a.what == "memory":
        print(json.dumps(rank_memory(a.dir, a.n, a.cache_dir, a.words)), flush=True)
    else:
        print(json.dumps(run_prepare(a.dir, a.n, a.workers, a.words)), flush=True)


if __name__ == "__main__":
    main()
