"""Helpers for tests: multi-rank CPU launches on 127.0.0.1, config files, metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_ds.data import PairTokenizer
from launcher.env import free_port

REPO = Path(__file__).resolve().parent.parent


def write_starting_adapter(model_dir: str, path: Path, target_modules: list[str], r: int = 4, alpha: int = 8) -> Path:
    """A PEFT adapter as an SFT stage would leave it, with B non-zero (a fresh adapter's B = 0 would leave its A
    untrained at the first step): the LoRA tests start the run and the plain PEFT model from it."""
    from peft import LoraConfig, get_peft_model

    from dpo_ds.lora import peft_model_built

    torch.manual_seed(1)
    with peft_model_built():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


def write_config(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def launch(args: list[str], nproc: int = 2, timeout: int = 600, check: bool = True, env: dict | None = None):
    """Run `python -m torch.distributed.run --nproc_per_node N <args>` (args: a script or `-m module ...`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc


PROBE_RUN_MARKER = "=== dist_train_probe run: "  # written to stderr before each run of tests/dist_train_probe.py --runs


def launch_probe_runs(runs: list[tuple[Path | list[str], Path]], spec: Path, **kwargs) -> list[str]:
    """One launch of tests/dist_train_probe.py running each (config, probe file) of `runs` in turn in one process
    group: a config file is trained, a list ["eval", ARG, ...] is `dpo-ds eval ARG ...`; returns each run's own
    part of the ranks' stderr, in order."""
    spec.write_text(json.dumps([[config if isinstance(config, list) else str(config), str(out)]
                                for config, out in runs]))
    proc = launch(["tests/dist_train_probe.py", "--runs", str(spec)], **kwargs)
    parts = proc.stderr.split(PROBE_RUN_MARKER)[1:]
    assert [part.split("\n", 1)[0] for part in parts] == [str(out) for _, out in runs], proc.stderr[-6000:]
    return parts


def run_cli(args: list[str], timeout: int = 600, check: bool = True):
    """`python -m dpo_ds ARGS` as a single process."""
    proc = subprocess.run([sys.executable, "-m", "dpo_ds", *args], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dpo_ds {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc


def sigmoid_pair_losses(micro_step: list[dict[str, torch.Tensor]], beta: float) -> list[torch.Tensor]:
    """Textbook DPO, -log sigma(beta d), of each pair of each rank's micro-batch (plain_dpo's default loss)."""
    return [-F.logsigmoid(beta * ((b["pc"] - b["rc"]) - (b["pr"] - b["rr"]))) for b in micro_step]


def completion_token_logps(model, tok, prompt: str, completion: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, one sequence without padding: each completion token's log-prob (the completion as dpo-ds
    tokenizes it: prompt + completion, EOS appended) and, for WPO, log sum_v p_v^2 of its next-token distribution."""
    prompt_ids = tok(prompt)["input_ids"]
    full = tok(prompt + completion)["input_ids"]
    completion_ids = full[len(prompt_ids):]
    if completion_ids[-1] != tok.eos_token_id:
        completion_ids = completion_ids + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    token_logps = log_probs.gather(-1, ids[0, 1:, None])[:, 0]
    sum_squares = torch.log((log_probs.detach().exp() ** 2).sum(-1))
    return token_logps[len(prompt_ids) - 1:], sum_squares[len(prompt_ids) - 1:]


def plain_dpo(model_dir: str, train_file: str, settings: dict, world: int, steps: list[list[int]] | None = None,
              policy: torch.nn.Module | None = None, reference: torch.nn.Module | None = None,
              pair_losses=sigmoid_pair_losses, unpaired: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step losses and final weights of textbook DPO (AdamW, warm-up + linear decay, global norm clipping),
    sequence by sequence without padding or DeepSpeed. Step k uses the pair indices steps[k] (default: pairs
    [k*G, (k+1)*G) of the file); its loss is the mean over them. `policy` / `reference` (default: the model at
    model_dir) let a test train e.g. a PEFT model; only parameters that require grad are trained.

    The loss: `pair_losses(micro_step, beta)` -> per-pair losses of each rank's micro-batch, where a micro-step
    is what the `world` ranks each score at once: a list (by rank) of dicts of [B] tensors pc, pr, rc, rr
    (policy / reference log-probs of chosen / rejected: sums, or LD-DPO's shared + ld_alpha x tail when
    settings has ld_alpha), nc, nr (completion token counts) and wc, wr (WPO: sums over the completion's
    tokens of log p(y_t) - log sum_v p_v^2 under the policy, detached). With the default order the micro-batch of
    rank r at micro-step m of a step is pairs [(m*world + r)*B, (m*world + r + 1)*B) of the step's pairs, as
    the sampler cuts them with shuffle off.

    `unpaired` (KTO): the file's unpaired rows (prompt, completion, label), or its pairs split into examples in
    pair order, chosen (label True) then rejected of each pair; the micro-batches hold examples. Each example's
    mismatched completion is the completion of the row before it (of split pairs: the example two before it,
    the previous pair's completion of the same side; cyclic), after its own prompt.
    A micro-batch is then a dict of [B] tensors p, r (policy / reference log-prob sums of the completion), n
    (tokens), kp, kr, kn (the same of the mismatched completion) and label (bool)."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = policy or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = (reference or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)).eval()
    rows = [json.loads(line) for line in open(train_file)]

    def token_logps(model, prompt: str, completion: str) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_token_logps(model, tok, prompt, completion)

    def pair_logps(model, row: dict) -> tuple[torch.Tensor, ...]:
        (chosen, chosen_sq), (rejected, rejected_sq) = (token_logps(model, row["prompt"], row["chosen"]),
                                                        token_logps(model, row["prompt"], row["rejected"]))
        counts = len(chosen), len(rejected)
        wpo = [(t.detach() - sq).sum() for t, sq in ((chosen, chosen_sq), (rejected, rejected_sq))]
        if settings.get("ld_alpha") is None:
            return chosen.sum(), rejected.sum(), *counts, *wpo
        shared = min(counts)  # LD-DPO: the longer completion's tail weighs ld_alpha
        return (*(t[:shared].sum() + settings["ld_alpha"] * t[shared:].sum() for t in (chosen, rejected)), *counts,
                *wpo)

    def micro_batch(indices: list[int]) -> dict[str, torch.Tensor]:
        batch = {"pc": [], "pr": [], "rc": [], "rr": [], "nc": [], "nr": [], "wc": [], "wr": []}
        for row in (rows[i] for i in indices):
            with torch.no_grad():
                ref_c, ref_r, _, _, _, _ = pair_logps(reference, row)
            pol_c, pol_r, nc, nr, wc, wr = pair_logps(policy, row)
            for key, value in zip(batch, (pol_c, pol_r, ref_c, ref_r, torch.tensor(float(nc)), torch.tensor(float(nr)),
                                          wc, wr)):
                batch[key].append(value)
        return {key: torch.stack(values) for key, values in batch.items()}

    if unpaired:
        if "completion" in rows[0]:  # an unpaired file: its rows in file order, the mismatched one the row before
            examples, shift = [(row["prompt"], row["completion"], row["label"]) for row in rows], 1
        else:
            examples, shift = [(row["prompt"], row[side], side == "chosen") for row in rows
                               for side in ("chosen", "rejected")], 2

        def micro_batch(indices: list[int]) -> dict[str, torch.Tensor]:  # noqa: F811 (the unpaired examples')
            batch = {"p": [], "r": [], "n": [], "kp": [], "kr": [], "kn": [], "label": []}
            for i in indices:
                prompt, completion, label = examples[i]
                mismatched = examples[(i - shift) % len(examples)][1]
                with torch.no_grad():
                    ref, ref_kl = (token_logps(reference, prompt, c)[0].sum() for c in (completion, mismatched))
                pol, pol_kl = (token_logps(policy, prompt, c)[0] for c in (completion, mismatched))
                for key, value in zip(batch, (pol.sum(), ref, torch.tensor(float(len(pol))), pol_kl.sum(), ref_kl,
                                              torch.tensor(float(len(pol_kl))), torch.tensor(label))):
                    batch[key].append(value)
            return {key: torch.stack(values) for key, values in batch.items()}

    trained = [p for p in policy.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings["learning_rate"],
                            eps=settings.get("adam_epsilon", 1e-8))
    total_steps, warmup = settings["max_steps"], settings["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warmup if s < warmup else max(0.0, (total_steps - s) / (total_steps - warmup)))
    b = settings["micro_batch_size"]
    g = b * settings["gradient_accumulation_steps"] * world
    steps = steps or [list(range(k * g, (k + 1) * g)) for k in range(total_steps)]
    losses = []
    for indices in steps:
        opt.zero_grad()
        total = 0.0
        per_micro_step = b * world
        for start in range(0, len(indices), per_micro_step):
            ranks = indices[start:start + per_micro_step]
            micro_step = [micro_batch(ranks[r * b:(r + 1) * b]) for r in range(world) if ranks[r * b:(r + 1) * b]]
            loss = torch.cat(pair_losses(micro_step, settings["beta"])).sum() / len(indices)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(trained, settings["max_grad_norm"])
        opt.step()
        sched.step()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in policy.named_parameters()}


def regex_bpe_tokenizer(kind: str, corpus: list[str], vocab_size: int = 600, chat_template: str | None = None):
    """A small BPE tokenizer of one of the kinds dpo_ds.data.prompt_reuse tells apart, trained on `corpus` in well
    under a second: 'gpt2' (ByteLevel with its regex), 'llama3' (Llama-3's Split + ByteLevel), 'qwen2' (Qwen2's
    Split + ByteLevel, NFC normalizer), 'prefix_space' (ByteLevel adding a prefix space), 'dropout' (BPE
    dropout), 'appends_eos' (a post-processor appending </s>). Specials <s> (prepended), </s>, <pad>; added
    tokens '<mask>' (eats spaces on its left) and 'ab cd' (contains a space)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from dpo_ds.data.prompt_reuse import SPLIT_PATTERNS

    pattern = {name: p for p, name in SPLIT_PATTERNS.items()}
    tok = Tokenizer(models.BPE(dropout=0.3 if kind == "dropout" else None))
    if kind in ("llama3", "qwen2"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern["Llama-3" if kind == "llama3" else "Qwen2"]), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=kind == "prefix_space")
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    single = "<s> $A </s>" if kind == "appends_eos" else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 0), ("</s>", 1)])
    tok.add_tokens([AddedToken("<mask>", lstrip=True), AddedToken("ab cd")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=chat_template)


TINY_SIZES = dict(num_hidden_layers=2, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=40, max_position_embeddings=64)
TINY_MOE = {"qwen3_moe": dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=8),
            "mixtral": dict(num_local_experts=3, num_experts_per_tok=2)}


def tiny_causal_lm(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised fp32 model of `model_type` small enough for unit tests, in eval mode."""
    from transformers import AutoConfig

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY_SIZES, **TINY_MOE.get(model_type, {}), **overrides})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


class FakeEngine:
    """The slice of a DeepSpeedEngine the step, the reference and the export use, over a plain module on the CPU:
    each step() applies the optimizer at once (no accumulation boundary) and records the forwards' inputs."""

    def __init__(self, module: torch.nn.Module, lr: float = 0.05):
        self.module = module
        self.device = torch.device("cpu")
        self.optimizer = torch.optim.SGD(module.parameters(), lr=lr)
        self.forwards: list[dict[str, torch.Tensor]] = []
        self.steps = 0

    def __call__(self, **inputs):
        self.forwards.append(inputs)
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.steps += 1

    def was_step_applied(self) -> bool:
        return True

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]


class StuckOnRow(PairTokenizer):
    """A pair tokenizer (tests/test_data.py) whose process hangs on a row whose prompt is `stuck_prompt`;
    importable by name, so a tokenizer process can unpickle it."""

    def __init__(self, tokenizer, max_length: int, stuck_prompt: str, ignore_terminate: bool = False):
        super().__init__(tokenizer, max_length)
        self.stuck_prompt, self.ignore_terminate = stuck_prompt, ignore_terminate

    def encode(self, rows):
        if any(row.prompt == self.stuck_prompt for row in rows):
            if self.ignore_terminate:  # as a process stuck in native code, or holding a handler that swallows it
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
        return super().encode(rows)
