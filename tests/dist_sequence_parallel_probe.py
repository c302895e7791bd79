"""Run under torchrun (2 ranks, or 4) by tests/test_sequence_parallel.py: DPO on a tiny Llama (or Mixtral) at
S=2 (DeepSpeed's Ulysses attention, dpo_ds.sequence_parallel) against the same model at S=1 in plain PyTorch.
With 4 ranks, ranks 2g, 2g + 1 form data-parallel group g and read pairs 2g, 2g + 1; the step's gradient is
then the mean of the two groups' gradients.

Usage: dist_sequence_parallel_probe.py OUT [FAMILY] (a key of FAMILIES, default llama). Rank 0 writes OUT
(JSON), one report per rank: per setting/layout the largest relative difference of the per-sequence log-prob
sums, of the loss and of the parameter gradients from S=1, whether the token counts are equal, and the ratios
of the gradient a sum with an identity backward would give.

S=1 comes first, in plain PyTorch with the textbook formula (log_softmax, gather, masked sum per sequence):
`setup` reroutes sdpa for the whole process. Settings at S=2: "plain" (no DeepSpeed engine; the gradients
averaged over all ranks, what ZeRO-3 does), "plain_fused_head" (the same, scored inside lm_head), "zero3" (a
ZeRO-3 engine built with the sequence-parallel mpu; DeepSpeed reduces), "zero3_tiled_mlp_checkpointing" (the
same with gradient checkpointing and TiledMLP), "zero3_reference" (a frozen ZeRO-3 inference engine with the
mpu and offloaded parameters, scored under no_grad: log-probs only).
"""
import json
import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_ds.data import TokenizedPairs, collate
from dpo_ds.parallel import Parallel
from dpo_ds.scoring import fused_head, score_forward
from dpo_ds.sequence_parallel import enable_tiled_mlp, setup, shard_batch, shard_forward_logps

BETA = 0.5
# (prompt, chosen, rejected) tokens of 4 pairs; pairs 0, 1: sequences of 11, 13 (chosen), 14, 7 (rejected),
# none but one a multiple of 2, so S=2 pads; pairs 2, 3 (the second data-parallel group of a 4-rank run)
LENGTHS = [(5, 6, 9), (3, 10, 4), (4, 7, 3), (6, 2, 11)]
REFERENCE = torch.tensor([-40.0, -50.0, -45.0, -30.0])  # log pi_ref of chosen 2g, 2g + 1, rejected 2g, 2g + 1


FAMILIES = {  # tiny configs: 2 layers, hidden 32, 4 attention heads, 2 key/value heads
    "llama": dict(intermediate_size=64, tie_word_embeddings=False),
    # mixture of experts (4, 2 per token), tied embeddings, head_dim None in its config
    "mixtral": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True),
}
DENSE_MLPS = {"llama": 2, "mixtral": 0}  # blocks enable_tiled_mlp tiles


def tiny_model(family: str) -> torch.nn.Module:
    config = AutoConfig.for_model(family, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=128,
                                  **FAMILIES[family])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def pairs() -> TokenizedPairs:
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()  # noqa: E731
    return TokenizedPairs(prompt=[ids(p) for p, _, _ in LENGTHS], chosen=[ids(c) for _, c, _ in LENGTHS],
                          rejected=[ids(r) for _, _, r in LENGTHS])


def dpo_loss(logps: torch.Tensor) -> torch.Tensor:
    b = logps.shape[0] // 2
    margin = (logps[:b] - REFERENCE[:b]) - (logps[b:] - REFERENCE[b:])
    return -F.logsigmoid(BETA * margin).mean()


def textbook_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """S=1: the model on the whole batch; per sequence the sum of log softmax(logits[t])[id[t+1]] over the
    positions whose next token is a completion token."""
    inputs = {"position_ids": batch["position_ids"]} if "sequence_ids" in batch else \
        {"attention_mask": batch["attention_mask"]}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits.float()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    scored = batch["loss_mask"][:, 1:]
    if "sequence_ids" not in batch:
        return (token * scored).sum(1), scored.sum(1).float()
    sequence = batch["sequence_ids"][0, 1:]
    n = int(sequence.max()) + 1
    return (torch.zeros(n).index_add(0, sequence, (token * scored)[0]),
            torch.zeros(n).index_add(0, sequence, scored[0].float()))


class SumIdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, group):
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def average_over_all_ranks(model) -> None:
    """What ZeRO-3 does to the gradients (its reduce-scatter path): their mean over all S x DP ranks."""
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def grads_of(model, zero: bool) -> dict[str, torch.Tensor]:
    return {n: (safe_get_full_grad(p) if zero else p.grad).detach().clone() for n, p in model.named_parameters()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compare(want: dict, logps, tokens, loss, grads) -> dict:
    return {"tokens_equal": bool(torch.equal(tokens, want["tokens"])),
            "logps_rel_diff": float(((logps - want["logps"]).abs() / want["logps"].abs()).max()),
            "loss_rel_diff": abs(float(loss) - want["loss"]) / abs(want["loss"]),
            "grad_rel_diff": max(rel(grads[n], g) for n, g in want["grads"].items())}


def main(out: str, family: str) -> None:
    parallel = Parallel.init(timeout_s=600, sequence_parallel_size=2)
    data = pairs()
    data_parallel = parallel.data_parallel_size  # group g: ranks 2g, 2g + 1, reading pairs 2g, 2g + 1
    group_batches = [{layout: collate(data, [2 * g, 2 * g + 1], pad_id=0, packed=layout == "packed")
                      for layout in ("padded", "packed")} for g in range(data_parallel)]
    model = tiny_model(family)
    want = {}
    for layout in ("padded", "packed"):
        per_group = []
        for batches in group_batches:
            model.zero_grad()
            logps, tokens = textbook_logps(model, batches[layout])
            loss = dpo_loss(logps)
            loss.backward()
            per_group.append({"logps": logps.detach(), "tokens": tokens, "loss": float(loss.detach()),
                              "grads": grads_of(model, False)})
        # the step's gradient: the mean over data-parallel groups of their micro-batch's gradient
        mine = dict(per_group[parallel.data_parallel_rank])
        mine["grads"] = {n: sum(g["grads"][n] for g in per_group) / data_parallel for n in mine["grads"]}
        want[layout] = mine
    batches = group_batches[parallel.data_parallel_rank]

    mpu = setup(parallel, model.config, "sdpa")
    group, rank = parallel.sequence_parallel_group, parallel.sequence_parallel_rank
    report = {"world_size": parallel.world_size, "family": family}
    for head_name, head in (("plain", None), ("plain_fused_head", fused_head(model))):
        for layout, batch in batches.items():
            model.zero_grad()
            shard = shard_batch(batch, 2, rank, pad_id=0)
            logps, tokens, _ = shard_forward_logps(model, shard, 4, head, group)
            loss = dpo_loss(logps)
            loss.backward()
            average_over_all_ranks(model)
            report[f"{head_name}/{layout}"] = compare(want[layout], logps.detach(), tokens, loss,
                                                      grads_of(model, False))

    # the alternative: a sum whose backward is the identity, on the padded batch
    model.zero_grad()
    shard = shard_batch(batches["padded"], 2, rank, pad_id=0)
    sums, tokens, _ = score_forward(model, shard.input_ids, {"position_ids": shard.position_ids}, shard.scoring,
                                    shard.scoring.positions(), 4, None, False)
    dpo_loss(SumIdentityBackward.apply(sums, group)).backward()
    average_over_all_ranks(model)
    grads = grads_of(model, False)
    report["identity_backward_grad_ratio"] = [float(grads[n].norm() / g.norm())
                                              for n, g in want["padded"]["grads"].items()]

    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 # lr 0: engine.step() clears the gradients and leaves the weights as they are
                 "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "weight_decay": 0.0, "torch_adam": True}},
                 "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True},
                 "steps_per_print": 1000000000}
    for setting in ("zero3", "zero3_tiled_mlp_checkpointing"):
        fresh = tiny_model(family)
        if setting != "zero3":  # the trainer's setup: checkpointed layers, here with MLPs in tiles of 4 positions
            assert enable_tiled_mlp(fresh, tile_tokens=4) == DENSE_MLPS[family]
            fresh.train()
            fresh.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        engine, _, _, _ = deepspeed.initialize(model=fresh, model_parameters=fresh.parameters(), config=ds_config,
                                               mpu=mpu)
        report[f"{setting}_train_batch_size"] = engine.train_batch_size()
        for layout, batch in batches.items():
            shard = shard_batch(batch, 2, rank, pad_id=0)
            logps, tokens, _ = shard_forward_logps(engine, shard, 4, fused_head(engine.module), group)
            loss = dpo_loss(logps)
            engine.backward(loss)
            report[f"{setting}/{layout}"] = compare(want[layout], logps.detach(), tokens, loss,
                                                    grads_of(engine.module, True))
            engine.step()

    # the reference: a frozen ZeRO-3 inference engine (no optimizer, parameters offloaded), scored without grad
    frozen = tiny_model(family).requires_grad_(False)
    reference, _, _, _ = deepspeed.initialize(model=frozen, mpu=mpu, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": False}}})
    reference.eval()
    for layout, batch in batches.items():
        with torch.no_grad():
            logps, tokens, _ = shard_forward_logps(reference, shard_batch(batch, 2, rank, pad_id=0), 4,
                                                   fused_head(reference.module), group)
        report[f"zero3_reference/{layout}"] = {
            "tokens_equal": bool(torch.equal(tokens, want[layout]["tokens"])),
            "logps_rel_diff": float(((logps - want[layout]["logps"]).abs() / want[layout]["logps"].abs()).max())}
    reports = [None] * parallel.world_size
    dist.all_gather_object(reports, report)
    if parallel.rank == 0:
        with open(out, "w") as f:
            json.dump(reports, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llama")
