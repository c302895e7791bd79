"""TRL DPOTrainer on the same model and the same pre-tokenized micro-batches as `dpo-ds bench` (run it in the
TRL venv from setup_trl_venv.sh, never in the project venv).

The ids are random, so they cannot be decoded and re-tokenized: the dataset already carries TRL's own
columns prompt_ids / chosen_ids / rejected_ids, and `_prepare_dataset` (extract prompt, add EOS, tokenize) is
skipped; a SequentialSampler keeps make_pairs.py's order so every step sees the same pairs as dpo-ds and
the plain step. fp32, gradient checkpointing on, AdamW, grad clip 1.0, sigmoid loss, live reference model.
Step time from a TrainerCallback (on_step_begin -> on_step_end).

    python benchmarks/trl_dpo.py --model_dir <output_dir>/bench_model/llama-60m --pairs pairs.json
"""
import argparse
import json
import resource
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import DPOConfig, DPOTrainer

p = argparse.ArgumentParser()
p.add_argument("--model_dir", required=True)
p.add_argument("--pairs", required=True)
p.add_argument("--beta", type=float, default=0.1)
p.add_argument("--lr", type=float, default=1e-6)
p.add_argument("--max_length", type=int, default=1024)
p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
a = p.parse_args()

data = json.load(open(a.pairs))
mbs = len(data["steps"][0][0])
rows = [x for step in data["steps"] for mb in step for x in mb]
assert all(len(mb) == mbs for step in data["steps"] for mb in step) and all(len(s) == 1 for s in data["steps"])
dataset = Dataset.from_list(rows)

# A stand-in tokenizer: only pad/eos ids are used (the data is already ids).
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>")),
                              pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")

gpu = torch.cuda.is_available()
# fp32: fp32 weights; bf16: fp32 master weights + bf16 autocast (the Trainer's bf16=True), as usual with TRL
model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
ref_model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)


class PreTokenizedDPOTrainer(DPOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # already prompt_ids / chosen_ids / rejected_ids

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)


timer = StepTimer()
out = tempfile.mkdtemp(prefix="trl-bench-")
args = DPOConfig(output_dir=out, per_device_train_batch_size=mbs, gradient_accumulation_steps=1,
                 max_steps=len(data["steps"]), learning_rate=a.lr, beta=a.beta, loss_type=["sigmoid"],
                 gradient_checkpointing=True, bf16=a.precision == "bf16", fp16=False, use_cpu=not gpu, report_to="none",
                 logging_steps=10_000, save_strategy="no", max_length=a.max_length, pad_to_multiple_of=None,
                 max_grad_norm=1.0, weight_decay=0.0, seed=42, dataloader_num_workers=0, disable_tqdm=True)
trainer = PreTokenizedDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                                 processing_class=tok, callbacks=[timer])
trainer.train()

w = data["warmup"]
times = timer.times[w:]
real = padded = 0
for step in data["steps"][w:]:
    for mb in step:
        seqs = [len(x["prompt_ids"]) + len(x[k]) for k in ("chosen_ids", "rejected_ids") for x in mb]
        seqs = [min(s, a.max_length) for s in seqs]
        real += sum(seqs)
        padded += max(seqs) * len(seqs)
import trl, transformers  # noqa: E402
print(json.dumps({"system": f"trl-{trl.__version__}", "transformers": transformers.__version__,
                  "step_times_s": times, "step_time_median_s": statistics.median(times),
                  "tokens_per_s": real / sum(times), "token_occupancy": real / padded,
                  "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "precision": a.precision, "device": torch.cuda.get_device_name() if gpu else "cpu",
                  "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}))
