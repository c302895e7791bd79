"""Peak memory of the output projection + sequence log-probs over a Llama-3-size vocabulary, forward + backward.

Starting from the last hidden states h [N, T, d] and the lm_head weight W [V, d] (both requiring grad):
- naive:   logits = h @ W.T, then torch.log_softmax(logits.float(), -1).gather(...)
- chunked: logits = h @ W.T, then dpo_ds.logprobs.sequence_logps (fused_lm_head: false)
- fused:   dpo_ds.logprobs.head_sequence_logps (fused_lm_head: true): only completion positions are projected,
           chunk by chunk; the [N, T, V] logits never exist.

Each case runs in its own subprocess. The figure is the process's peak RSS (ru_maxrss) after forward + backward
minus its RSS once h and W exist: the extra memory scoring needs, including W.grad and h.grad (needed by any
method). The hidden size does not change the logits' size; a small d keeps the CPU matmuls short.

    python benchmarks/logprob_memory.py [--rows 2 --tokens 2048 --vocab 128256 --hidden 256]
"""
import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 2**30
METHODS = ("naive", "chunked", "fused")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def case(method: str, dtype: str, rows: int, tokens: int, vocab: int, hidden_size: int) -> dict:
    import torch
    from dpo_ds.logprobs import head_sequence_logps, sequence_logps

    torch.manual_seed(0)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    hidden = torch.randn(rows, tokens, hidden_size, dtype=dt).requires_grad_()
    weight = (torch.randn(vocab, hidden_size) / hidden_size ** 0.5 * 4).to(dt).requires_grad_()
    ids = torch.randint(0, vocab, (rows, tokens))
    mask = torch.zeros(rows, tokens, dtype=torch.bool)
    mask[:, tokens // 4:] = True  # the last 3/4 of each row is completion
    base = rss_now()
    resource_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if method == "fused":
        sums, _ = head_sequence_logps(hidden, weight, ids, mask)
    elif method == "chunked":
        sums, _ = sequence_logps(hidden @ weight.T, ids, mask)
    else:
        lp = torch.log_softmax((hidden @ weight.T)[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        sums = torch.where(mask[:, 1:], lp, 0.0).sum(-1)
    sums.sum().backward()
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "dtype": dtype, "rows": rows, "tokens": tokens, "vocab": vocab, "hidden": hidden_size,
            "logits_gib": rows * tokens * vocab * hidden.element_size() / GIB,
            "rss_with_inputs_gib": base / GIB, "peak_rss_gib": peak / GIB,
            "extra_peak_gib": (peak - max(base, resource_base)) / GIB, "seconds": elapsed,
            "logps_sum": float(sums.detach().sum()),
            "grad_checksum": float(weight.grad.float().abs().sum() + hidden.grad.float().abs().sum())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--case", nargs=2, metavar=("METHOD", "DTYPE"))
    a = p.parse_args()
    shape = ["--rows", str(a.rows), "--tokens", str(a.tokens), "--vocab", str(a.vocab), "--hidden", str(a.hidden)]
    if a.case:
        print(json.dumps(case(*a.case, a.rows, a.tokens, a.vocab, a.hidden)))
        return
    results = []
    for dtype in ("bf16", "fp32"):
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, "--case", method, dtype, *shape],
                                 capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else None
            r = json.loads(line) if line else {"method": method, "dtype": dtype, "error": out.stderr[-500:]}
            results.append(r)
            print(json.dumps(r), flush=True)
    print("| dtype | method | logits would be (GiB) | extra peak RSS, fwd + bwd (GiB) | time (s) | sum of log-probs |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        if "error" not in r:
            print(f"| {r['dtype']} | {r['method']} | {r['logits_gib']:.2f} | {r['extra_peak_gib']:.2f} | "
                  f"{r['seconds']:.1f} | {r['logps_sum']:.1f} |")


if __name__ == "__main__":
    main()
