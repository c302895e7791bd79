"""Writes the exact micro-batches `dpo-ds bench` trains on (same synthetic pairs, same sampler order) to JSON,
so the plain-PyTorch and TRL baselines see identical token ids, lengths and batch composition.

    python benchmarks/make_pairs.py --lengths lognormal:256,0.6 --micro_batch_size 4 --warmup 1 --steps 3 --out pairs.json
"""
import argparse
import json

from dpo_ds.bench import synthetic_pairs
from dpo_ds.config import TrainConfig
from dpo_ds.data import PairSampler

p = argparse.ArgumentParser()
p.add_argument("--lengths", required=True)
p.add_argument("--micro_batch_size", type=int, default=4)
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--max_length", type=int, default=1024)
p.add_argument("--vocab_size", type=int, default=32000)
p.add_argument("--seed", type=int, default=42)
p.add_argument("--out", required=True)
a = p.parse_args()

cfg = TrainConfig(model_name_or_path="x", train_file="x", micro_batch_size=a.micro_batch_size, max_length=a.max_length,
                  seed=a.seed)
total = a.warmup + a.steps
n = total * cfg.global_batch_pairs(1)  # what `dpo-ds bench` generates for 1 rank without a token budget
pairs = synthetic_pairs(n, a.lengths, cfg.max_length, a.vocab_size, cfg.seed)
sampler = PairSampler.for_config(cfg, pairs, 1)
steps = []
for step in range(total):
    steps.append([[{"prompt_ids": pairs.prompt[i].tolist(), "chosen_ids": pairs.chosen[i].tolist(),
                    "rejected_ids": pairs.rejected[i].tolist()}
                   for i in mb] for mb in sampler.micro_batches(step, 0)])
json.dump({"lengths": a.lengths, "warmup": a.warmup, "steps": steps}, open(a.out, "w"))
real = [sum(len(x["prompt_ids"]) * 2 + len(x["chosen_ids"]) + len(x["rejected_ids"]) for mb in s for x in mb) for s in steps]
print(json.dumps({"pairs": n, "real_tokens_per_step": real}))
