"""Peak memory of sequence log-probs over a Llama-3-size vocabulary: dpo_ds.logprobs.sequence_logps (chunked,
each chunk checkpointed) vs the naive torch.log_softmax(logits.float(), -1).gather(...), forward + backward.

Each case runs in its own subprocess. Its logits [N, T, V] (requires_grad, a leaf) are created and touched
first; the reported figure is the process's peak RSS (ru_maxrss) after forward+backward minus its RSS right
after the logits exist: the extra memory the log-prob computation needs, including logits.grad (same size as
the logits, needed by any method).

    python benchmarks/logprob_memory.py [--rows 2 --tokens 2048 --vocab 128256]
"""
import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 2**30


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def case(method: str, dtype: str, rows: int, tokens: int, vocab: int) -> dict:
    import torch
    from dpo_ds.logprobs import sequence_logps

    torch.manual_seed(0)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    logits = torch.randn(rows, tokens, vocab, dtype=dt).requires_grad_()
    ids = torch.randint(0, vocab, (rows, tokens))
    mask = torch.zeros(rows, tokens, dtype=torch.bool)
    mask[:, tokens // 4:] = True
    base = rss_now()
    resource_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if method == "chunked":
        sums, _ = sequence_logps(logits, ids, mask)
    else:
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        sums = torch.where(mask[:, 1:], lp, 0.0).sum(-1)
    sums.sum().backward()
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "dtype": dtype, "shape": [rows, tokens, vocab],
            "logits_gib": logits.numel() * logits.element_size() / GIB,
            "rss_with_logits_gib": base / GIB, "peak_rss_gib": peak / GIB,
            "extra_peak_gib": (peak - max(base, resource_base)) / GIB, "seconds": elapsed,
            "logps_sum": float(sums.detach().sum())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--case", nargs=2, metavar=("METHOD", "DTYPE"))
    a = p.parse_args()
    if a.case:
        print(json.dumps(case(*a.case, a.rows, a.tokens, a.vocab)))
        return
    results = []
    for dtype in ("bf16", "fp32"):
        for method in ("naive", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--case", method, dtype, "--rows", str(a.rows),
                                  "--tokens", str(a.tokens), "--vocab", str(a.vocab)], capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else None
            r = json.loads(line) if line else {"method": method, "dtype": dtype, "error": out.stderr[-500:]}
            results.append(r)
            print(json.dumps(r), flush=True)
    print("| logits dtype | method | logits (GiB) | extra peak RSS fwd+bwd (GiB) | time (s) |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        if "error" not in r:
            print(f"| {r['dtype']} | {r['method']} | {r['logits_gib']:.2f} | {r['extra_peak_gib']:.2f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
