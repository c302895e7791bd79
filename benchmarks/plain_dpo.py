"""A minimal plain-PyTorch DPO step (no DeepSpeed), the baseline for `dpo-ds bench`.

Policy + frozen reference copy (fp32), AdamW, right-padded 2B batch [chosen ; rejected], full fp32
log_softmax over the vocabulary, non-reentrant gradient checkpointing, grad-norm clip 1.0, sigmoid loss.
Trains on the micro-batches written by make_pairs.py (identical ids/lengths/order to `dpo-ds bench`).

    python benchmarks/plain_dpo.py --model_dir <output_dir>/bench_model/llama-60m --pairs pairs.json
Prints one JSON line: step times (timed steps), real tokens, peak RSS of this process.
"""
import argparse
import copy
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model_dir", required=True)
p.add_argument("--pairs", required=True)
p.add_argument("--beta", type=float, default=0.1)
p.add_argument("--lr", type=float, default=1e-6)
a = p.parse_args()

torch.manual_seed(42)
data = json.load(open(a.pairs))
policy = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
policy.config.use_cache = False
policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
policy.train()
reference = copy.deepcopy(policy).eval().requires_grad_(False)
opt = torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=0.0)


def collate(mb):
    seqs, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for x in mb:
            seqs.append(x["prompt_ids"] + x[key])
            masks.append([0] * len(x["prompt_ids"]) + [1] * len(x[key]))
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    att = torch.zeros(len(seqs), width, dtype=torch.long)
    lm = torch.zeros(len(seqs), width, dtype=torch.bool)
    for r, (s, m) in enumerate(zip(seqs, masks)):
        ids[r, :len(s)] = torch.tensor(s)
        att[r, :len(s)] = 1
        lm[r, :len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, att, lm


def seq_logps(model, ids, att, lm):
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # full fp32 log-softmax
    return (logp * lm[:, 1:]).sum(-1)


times, real, padded = [], 0, 0
split = dict.fromkeys(("reference_forward", "policy_forward", "backward", "optimizer"), 0.0)
for step, micro_batches in enumerate(data["steps"]):
    t0 = time.perf_counter()
    tok_real = tok_pad = 0
    for mb in micro_batches:
        ids, att, lm = collate(mb)
        b = len(mb)
        t = time.perf_counter()
        with torch.no_grad():
            ref = seq_logps(reference, ids, att, lm)
        split["reference_forward"] += time.perf_counter() - t; t = time.perf_counter()
        pol = seq_logps(policy, ids, att, lm)
        logits = a.beta * ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:]))
        loss = -F.logsigmoid(logits).mean() / len(micro_batches)
        split["policy_forward"] += time.perf_counter() - t; t = time.perf_counter()
        loss.backward()
        split["backward"] += time.perf_counter() - t
        tok_real += int(att.sum())
        tok_pad += ids.numel()
    t = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    split["optimizer"] += time.perf_counter() - t
    dt = time.perf_counter() - t0
    if step < data["warmup"]:
        split = dict.fromkeys(split, 0.0)  # timed steps only
    else:
        times.append(dt)
        real += tok_real
        padded += tok_pad
print(json.dumps({"system": "plain-pytorch", "step_times_s": times, "step_time_median_s": statistics.median(times),
                  "tokens_per_s": real / sum(times), "token_occupancy": real / padded,
                  "split_s_per_step": {k: v / len(times) for k, v in split.items()},
                  "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
