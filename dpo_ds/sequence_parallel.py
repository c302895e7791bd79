"""Sequence parallelism for DPO on DeepSpeed's Ulysses (ALST): S ranks share every sequence.

With `sequence_parallel_size: S`, the world is cut into data-parallel groups of S consecutive ranks (ranks
[i*S, (i+1)*S) form sequence-parallel group i: DeepSpeed's `parallel_state_sp`, the mpu that
`UlyssesSPAttentionHF.register_with_transformers` returns). Every rank of a group holds the same micro-batch;
each runs the model on one contiguous 1/S of the sequence dimension. Inside each attention layer DeepSpeed's
`UlyssesSPAttentionHF` exchanges query/key/value by all-to-all so that every rank attends over the whole
sequence for 1/S of the heads, then exchanges the outputs back. Everything else (embeddings, MLP, norms, the
fused lm_head scoring) is per token and runs on the rank's shard only.

The pieces, in the order a run uses them:

1. `check_settings` (before anything loads): S divides the world size and the attention heads, the key/value
   heads follow DeepSpeed's rule, no eager attention, a model family the patch covers; `check_deepspeed_config`
   on the resolved policy DeepSpeed config; a ConfigError naming `sequence_parallel_size` otherwise.
2. `setup` (once per run, after `Parallel.init`, before any model is built; `attention_for_run` calls it):
   DeepSpeed's sequence-parallel groups, and `ALL_ATTENTION_FUNCTIONS[kernel]` routed through
   `UlyssesSPAttentionHF`; returns the `mpu` every `deepspeed.initialize` (policy and reference) is given.
3. `shard_batch` (CPU, after `collate`): the rank's contiguous shard of the collated micro-batch, with its
   position ids and its slice of the whole batch's `Scoring` (a shard's last position predicts the next
   shard's first token, so targets, scored mask and sequence of each position are computed before cutting).
4. `shard_forward_logps`: the forward on the shard and the per-sequence log-prob sums and token counts summed
   over the group (`sum_over_group`), differentiably: whole-sequence values, equal on every rank of the group.
5. `BatchScorer`: how the step scores a collated batch with an engine, whole at S = 1, through 3 and 4 at S > 1.
6. `enable_tiled_mlp`: dense MLPs in sequence tiles (DeepSpeed's TiledMLP), for the longest sequences (the
   `tiled_mlp` field; engines.models applies it).

How the trainer calls it (the integration contract):

- Settings: `check_models(cfg, world_size)` (check_settings for the policy and a separate reference) in
  check_before_loading, `check_deepspeed_config(resolve_policy_config(...), S, source)`. Build both models with
  `ulysses_kernel(attention_kernel(cfg))` as attn_implementation (S > 1).
- Groups: `parallel = Parallel.init(timeout, S)`, then `mpu = attention_for_run(cfg, parallel, kernel)` in
  step.build_step_context (setup at S > 1; None at S = 1).
- `dpo-ds eval` (evaluate.run) does the same without training: Parallel.init with S, check_models,
  attention_for_run, the reference (build_reference, given the mpu) and the scored inference engine (given the
  mpu and the kernel), then step.evaluate_pairs, whose pair_step scores through BatchScorer as training does.
  Shards and sums use `parallel.sequence_parallel_rank` / `parallel.sequence_parallel_group`; DeepSpeed's
  Ulysses attention uses the mpu's own group of the same ranks.
- DeepSpeed: `deepspeed.initialize(..., mpu=mpu)` for the policy and the reference engine, and
  `train_batch_size` = micro_batch_size x gradient_accumulation_steps x parallel.data_parallel_size
  (DeepSpeed divides the world by S when an mpu is given). ZeRO-3 still partitions over all world ranks.
- Sampler, pair weighting, eval shares, metrics and the NaN/max_kl guards: by data-parallel rank and size
  (Parallel), so the S ranks of a group read the same micro-batches in the same order (same indices, same
  loss_scale); the whole-sequence log-probs are equal on the S ranks, so a pair counts once per
  data-parallel group (Parallel.sum_over_data).
- Step (step.pair_step): `BatchScorer(parallel, pad_id)(policy, micro.tensors, chunk, head, router_aux)`,
  which at S > 1 is `shard_forward_logps(policy, shard_batch(micro.tensors, S, sequence-parallel rank, pad_id),
  chunk, head, parallel.sequence_parallel_group, router_aux)`; the loss as without S, `policy.backward(loss)`,
  no other scaling ("Gradients" below). Under S > 1 no attention_mask and no flash-attention cu_seq_lens are
  passed: position ids carry the layout (the full row's, gathered inside each attention layer).
- Reference: the live engine runs the same BatchScorer under torch.no_grad; LoRA: the same
  call with the adapter off; precompute_ref: computed the same way and written once per data-parallel group
  (sequence-parallel rank 0). Its log-probs are whole-sequence values: the cache does not depend on S.
- MoE router loss: `aux` is the load-balancing loss of the rank's shard (its routers see 1/S of the tokens);
  its gradient is averaged over the S ranks by ZeRO-3 like any per-rank term.

Gradients (why `sum_over_group`'s backward is an all-reduce too). Rank r computes partial sums s_r; the
forward all-reduce gives s = sum_r s_r on every rank, and every rank computes the same loss L(s). Seeding
dL/ds into each rank's own s_r, the all-to-alls' backward carries every contribution back to the rank that
computed it, and the parts g_r of the S ranks add up to the exact gradient: sum_r g_r = dL/dtheta. ZeRO-3
(0.19.8, its default reduce-scatter path: coalesced_collectives.reduce_scatter_coalesced) divides every
rank's gradient by the world size S x DP and sums over all ranks, so it needs S x g_r from each rank to give
(1/DP) sum over data-parallel groups of their exact micro-batch gradients, the gradient of a run without S.
The backward all-reduce gives that factor: each rank receives sum_q dL_q/ds = S x dL/ds. With an identity
backward the gradient would be 1/S of the right one. (ZeRO-3's other path, `reduce_scatter: false`, divides
by DP instead, for buckets up to reduce_bucket_size only: `check_deepspeed_config` refuses it under S > 1.)
tests/dist_sequence_parallel_probe.py measures this with a ZeRO-3 engine, and both alternatives.

Attention: DeepSpeed's `register_with_transformers` builds one `UlyssesSPAttentionHF` for one batch size
(its shapes are asserted), and under sdpa it drops the mask and attends causally over the whole row, across
the sequences of a packed row. DPO micro-batches change their row count (2B padded rows, 1 packed row,
smaller eval and token-budget batches) and pack sequences, so `setup` builds the same `UlyssesSPAttentionHF`
and groups itself, sets the row count per call, and under sdpa attends each packed sequence separately
(flash attention finds the sequences in the gathered position ids itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from dpo_ds import packed_attention
from dpo_ds.config import ConfigError, TrainConfig, uses_reference
from dpo_ds.logprobs import Scoring, scoring_of
from dpo_ds.parallel import Parallel

FIELD = "sequence_parallel_size"
ATTENTION_LAYER_KINDS = ("full_attention", "sliding_attention")  # layer_types entries attention kernels compute
FLASH_KERNELS = ("flash_attention_2", "flash_attention_3")


# --------------------------------------------------------------------------- settings
def ulysses_kernel(attn_implementation: str | None) -> str:
    """The attention kernel models are built with under S > 1: the one asked for, or sdpa for the model's
    default (None), since the patch must know which kernel it wraps."""
    return attn_implementation or "sdpa"


def check_settings(sequence_parallel_size: int, world_size: int, model_config: Any, attn_implementation: str | None,
                   max_length: int) -> None:
    """Raise ConfigError naming `sequence_parallel_size` for settings sequence parallelism cannot run with.

    `model_config`: the policy's transformers config; `attn_implementation`: engines.attention_kernel's answer
    (None: the model's default); `max_length`: the longest sequence (prompt + completion)."""
    size = sequence_parallel_size

    def refuse(why: str):
        raise ConfigError(f"field '{FIELD}': {why}", FIELD)

    if size < 1:
        refuse(f"must be at least 1, not {size}")
    if world_size % size:
        refuse(f"{size} does not divide the world size {world_size} (data-parallel groups are S consecutive ranks)")
    if size == 1:
        return
    kernel = ulysses_kernel(attn_implementation)
    if kernel == "eager":
        refuse(f"{size} needs attn_implementation sdpa or flash_attention_2/3: eager attention builds the full "
               f"[T, T] mask, which DeepSpeed's Ulysses attention does not take")
    if kernel not in ("sdpa", *FLASH_KERNELS):
        refuse(f"{size} runs with attn_implementation sdpa or flash_attention_2/3, not {kernel} (under "
               f"flex_attention DeepSpeed rebuilds a plain causal mask, which ignores packed sequences)")
    text = model_config.get_text_config()
    why = uncovered_reason(text, kernel, max_length)
    if why:
        refuse(f"{size} cannot shard a {model_config.model_type} model: {why}")
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    if heads % size:
        refuse(f"{size} does not divide the model's {heads} attention heads (each rank attends with heads / S)")
    if kv_heads % size and size % kv_heads:
        refuse(f"{size} and the model's {kv_heads} key/value heads must divide one another (DeepSpeed's Ulysses "
               f"splits the key/value heads over the ranks, or replicates them when there are fewer than S)")


def check_models(cfg: TrainConfig, world_size: int) -> None:
    """`check_settings` for every model a run builds under `cfg` on `world_size` ranks: the policy (the model
    `dpo-ds eval` scores) and a separate reference; shared by train, eval and bench, so each refuses alike."""
    from dpo_ds.engines.models import attention_kernel
    from dpo_ds.families import load_model_config

    paths = [cfg.model_name_or_path]
    if cfg.ref_model_name_or_path and uses_reference(cfg):
        paths.append(cfg.ref_model_name_or_path)
    for path in paths:
        check_settings(cfg.sequence_parallel_size, world_size, load_model_config(path, cfg.trust_remote_code),
                       attention_kernel(cfg), cfg.max_length)


def uncovered_reason(text_config: Any, kernel: str, max_length: int) -> str | None:
    """Why DeepSpeed's Ulysses attention would compute something else than the model does, or None."""
    missing = [name for name in ("num_attention_heads", "num_key_value_heads")
               if getattr(text_config, name, None) is None]
    if missing:
        return (f"its config has no {' / '.join(missing)}, which the Ulysses attention reads to split the heads "
                f"(models of this layout do not route attention through the kernel it wraps)")
    layer_types = getattr(text_config, "layer_types", None) or ()
    other = sorted({kind for kind in layer_types if kind not in ATTENTION_LAYER_KINDS})
    if other:
        return (f"its {', '.join(other)} layers mix the sequence outside an attention kernel, so each rank would "
                f"see only its own shard there")
    v_head_dim = getattr(text_config, "v_head_dim", None)
    if v_head_dim is not None and v_head_dim != head_size(text_config):
        return "its value heads are narrower or wider than its query heads; the Ulysses exchange assumes one head size"
    window = packed_attention.sliding_window_below(text_config, max_length)
    if window is not None and kernel not in FLASH_KERNELS:
        return (f"its sliding-window attention (window {window} < max_length {max_length}) is a mask under "
                f"{kernel}, which the Ulysses attention drops; use flash_attention_2/3 (it takes the window as "
                f"an argument) or max_length <= {window}")
    return None


def head_size(text_config: Any) -> int:
    """Width of one attention head: head_dim where the config sets it (some set it to None), else hidden / heads."""
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def check_deepspeed_config(ds_config: dict, sequence_parallel_size: int, source: str) -> None:
    """Refuse a policy DeepSpeed config (resolved, from `source`) whose ZeRO-3 gradient averaging under S > 1
    is not the one `sum_over_group` is scaled for (module docstring, "Gradients")."""
    if sequence_parallel_size > 1 and ds_config.get("zero_optimization", {}).get("reduce_scatter", True) is False:
        raise ConfigError(f"field '{FIELD}': {sequence_parallel_size} needs zero_optimization.reduce_scatter true "
                          f"in {source}: without it ZeRO-3 averages a gradient over the data-parallel ranks or over "
                          f"all ranks depending on its bucket's size", FIELD)


# --------------------------------------------------------------------------- groups and the attention patch
_CORE_KERNELS: dict[str, Any] = {}  # the attention kernels `setup` routed through the Ulysses attention, by name


def setup(parallel: Parallel, model_config: Any, kernel: str):
    """Build DeepSpeed's sequence-parallel groups (`parallel_state_sp`, the mpu register_with_transformers
    returns, to be given to deepspeed.initialize) and route attention kernel `kernel` (ulysses_kernel's answer)
    through DeepSpeed's UlyssesSPAttentionHF for `model_config`'s heads, for every model this process runs with
    that kernel. For a `parallel` (dpo_ds.parallel.Parallel) with sequence_parallel_size > 1, once per run: the
    groups are built once per process (DeepSpeed keeps them in module globals), the routing is rebuilt from the
    original kernel for each run's model."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(sequence_parallel_size=parallel.sequence_parallel_size)
    elif mpu.get_sequence_parallel_world_size() != parallel.sequence_parallel_size:
        raise ValueError(f"this process already runs sequence parallelism of size "
                         f"{mpu.get_sequence_parallel_world_size()}, not {parallel.sequence_parallel_size}")
    text = model_config.get_text_config()
    core = _CORE_KERNELS.setdefault(kernel, ALL_ATTENTION_FUNCTIONS[kernel])
    ulysses = UlyssesSPAttentionHF(
        attn=packed_attention.per_sequence(core) if kernel == "sdpa" else core, batch_size=1,
        attn_head_count=text.num_attention_heads, attn_head_size=head_size(text),
        kv_head_count=text.num_key_value_heads, num_hidden_layers=text.num_hidden_layers,
        process_group=mpu.get_sequence_parallel_group(), seq_length_is_variable=True)
    ulysses.core_attn_implementation = kernel
    ALL_ATTENTION_FUNCTIONS[kernel] = _UlyssesAttention(ulysses)
    return mpu


def attention_for_run(cfg: TrainConfig, parallel: Parallel, kernel: str | None):
    """Before a run builds its models: `setup`'s mpu for deepspeed.initialize under S > 1 (`kernel`:
    engines.attention_kernel's answer); None at S = 1, with the original attention kernels back where an
    earlier run of this process routed them."""
    if parallel.sequence_parallel_size > 1:
        from dpo_ds.families import load_model_config

        return setup(parallel, load_model_config(cfg.model_name_or_path, cfg.trust_remote_code), ulysses_kernel(kernel))
    if _CORE_KERNELS:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        for name, core in _CORE_KERNELS.items():
            ALL_ATTENTION_FUNCTIONS[name] = core
        _CORE_KERNELS.clear()
    return None


class _UlyssesAttention:
    """What transformers calls as the attention kernel: DeepSpeed's Ulysses attention for this call's row count.

    The mask is dropped, as in register_with_transformers: it was built for the local shard; causality and
    packing come from the gathered position ids."""

    def __init__(self, ulysses):
        self.ulysses = ulysses

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        rows = query.shape[0]
        u = self.ulysses
        if u.batch_size != rows:  # the shapes it asserts hold the row count (the sequence length it updates itself)
            u.batch_size = rows
            u.required_query_shape = torch.Size([1, rows, *u.required_query_shape[2:]])
            u.required_key_value_shape = torch.Size([1, rows, *u.required_key_value_shape[2:]])
            u.required_context_shape = torch.Size([1, rows, *u.required_context_shape[2:]])
        return u(module, query, key, value, None, *args, **kwargs)


# --------------------------------------------------------------------------- sharding
@dataclass
class SequenceShard:
    """One rank's contiguous 1/S of a collated micro-batch's sequence dimension: [N, T / S] each."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    scoring: Scoring  # this shard's slice of the whole batch's Scoring


def shard_batch(batch: dict[str, torch.Tensor], size: int, rank: int, pad_id: int, wpo: bool = False
                ) -> SequenceShard:
    """Shard `rank` of `size` of a collated batch (data.collate: right-padded rows, or one packed row).

    The sequence dimension is padded to a multiple of `size` with `pad_id` tokens that are never scored
    (padded rows: positions continue; a packed row: one more sequence, positions from 0, so it attends to
    nothing before it). Scoring is computed on the whole batch before cutting, so the last position of a
    shard scores the first token of the next one; summed over the shards, each sequence's log-probs and
    token counts are the unsharded batch's. `wpo`: the shard's Scoring also sums WPO's token terms."""
    input_ids, loss_mask, weights = batch["input_ids"], batch["loss_mask"], batch.get("token_weights")
    rows, length = input_ids.shape
    if "sequence_ids" in batch:
        sequence_ids = batch["sequence_ids"]
        scoring = scoring_of(input_ids, loss_mask, sequence_ids, int(sequence_ids.max()) + 1, weights, wpo)
        positions = batch["position_ids"]
    else:
        scoring = scoring_of(input_ids, loss_mask, token_weights=weights, wpo=wpo)
        positions = torch.arange(length).expand(rows, length)
    width = math.ceil(length / size) * size
    extra = width - length
    if extra:
        filler = torch.arange(extra).expand(rows, extra)
        padded_positions = filler if "sequence_ids" in batch else filler + length
        input_ids = torch.cat([input_ids, input_ids.new_full((rows, extra), pad_id)], dim=1)
        positions = torch.cat([positions, padded_positions.to(positions.dtype)], dim=1)
        scoring = replace(scoring, targets=torch.cat([scoring.targets, scoring.targets.new_zeros(rows, extra)], dim=1),
                          mask=torch.cat([scoring.mask, scoring.mask.new_zeros(rows, extra)], dim=1),
                          segments=torch.cat([scoring.segments, scoring.segments[:, -1:].expand(rows, extra)], dim=1),
                          weights=None if weights is None else
                          torch.cat([scoring.weights, scoring.weights.new_zeros(rows, extra)], dim=1))
    part = slice(rank * width // size, (rank + 1) * width // size)
    cut = lambda t: None if t is None else t[:, part].contiguous()  # noqa: E731
    return SequenceShard(cut(input_ids), cut(positions), replace(scoring, targets=cut(scoring.targets),
                                                                 mask=cut(scoring.mask), segments=cut(scoring.segments),
                                                                 weights=cut(scoring.weights)))


# --------------------------------------------------------------------------- the reduction
class _SumOverGroup(torch.autograd.Function):
    """Forward: the sum over the group's ranks. Backward: the sum of the incoming gradients over the group's
    ranks, S x dL/dsum since every rank computes the same loss: the factor ZeRO-3's average over all S x DP
    ranks takes back out (module docstring, "Gradients")."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        from launcher.dist import all_reduce

        ctx.group = group
        return all_reduce(partial, group=group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from launcher.dist import all_reduce

        return all_reduce(grad, group=ctx.group), None


def sum_over_group(sums: torch.Tensor, tokens: torch.Tensor, group, *detached: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sequence log-prob sums and token counts of the shards, summed over the group's ranks (one
    all-reduce; differentiable in `sums`), and any further per-sequence sums without gradient (`detached`: WPO's)."""
    rows = [sums, tokens.to(sums.dtype), *(d.to(sums.dtype) for d in detached)]
    total = _SumOverGroup.apply(torch.stack(rows), group)
    return (total[0], total[1].to(tokens.dtype),
            *(row.detach().to(d.dtype) for row, d in zip(total[2:], detached)))


def shard_forward_logps(engine, shard: SequenceShard, chunk_size: int, head: torch.nn.Linear | None, group,
                        router_aux: bool = False) -> tuple[torch.Tensor, ...]:
    """`scoring.forward_logps` for a shard: the forward on the rank's shard, then the whole-sequence log-prob
    sums and token counts (summed over `group`, the sequence-parallel group), the shard's router loss when
    `router_aux`, and the whole-sequence WPO sums when the shard's Scoring asks for them."""
    from dpo_ds.scoring import score_forward, to_device

    device = engine.device
    weights = shard.scoring.weights
    scoring = replace(shard.scoring, targets=to_device(shard.scoring.targets, device),
                      mask=to_device(shard.scoring.mask, device), segments=to_device(shard.scoring.segments, device),
                      weights=None if weights is None else to_device(weights, device))
    sums, tokens, aux, *wpo = score_forward(engine, to_device(shard.input_ids, device),
                                            {"position_ids": to_device(shard.position_ids, device)}, scoring,
                                            shard.scoring.positions(), chunk_size, head, router_aux)
    sums, tokens, *wpo = sum_over_group(sums, tokens, group, *wpo)
    return sums, tokens, aux, *wpo


@dataclass(frozen=True)
class BatchScorer:
    """How this run's engines score a collated batch (scoring.forward_logps's signature and results): the whole
    batch at S = 1; this rank's shard, summed over its sequence-parallel group, at S > 1. The policy and the
    reference are scored through it, so both see the same shards."""
    parallel: Parallel
    pad_id: int  # the filler of a sequence dimension padded to a multiple of S

    def __call__(self, engine, batch: dict[str, torch.Tensor], chunk_size: int, head: torch.nn.Linear | None,
                 router_aux: bool = False, wpo: bool = False) -> tuple[torch.Tensor, ...]:
        from dpo_ds import scoring  # through the module: tests/dist_fault_probe.py replaces forward_logps

        size = self.parallel.sequence_parallel_size
        if size == 1:
            return scoring.forward_logps(engine, batch, chunk_size, head, router_aux, wpo)
        shard = shard_batch(batch, size, self.parallel.sequence_parallel_rank, self.pad_id, wpo)
        return shard_forward_logps(engine, shard, chunk_size, head, self.parallel.sequence_parallel_group, router_aux)


# --------------------------------------------------------------------------- tiled MLP
def enable_tiled_mlp(model: torch.nn.Module, tile_tokens: int | None = None) -> int:
    """Compute every dense MLP block (`*.mlp` modules without experts) of `model` in sequence tiles with
    DeepSpeed's TiledMLP: the [tokens, intermediate] activations exist one tile at a time, and the backward
    recomputes each tile. Returns the number of blocks patched; before deepspeed.initialize or after, the same.

    Tiles: ceil(tokens / tile_tokens), tile_tokens = hidden_size by default (DeepSpeed's choice: a tile's
    activations about a hidden x hidden block); the largest count over all ranks, since under ZeRO-3 every
    rank must gather the block's parameters the same number of times."""
    tile_tokens = tile_tokens or model.config.get_text_config().hidden_size
    patched = 0
    for name, module in model.named_modules():
        if name.endswith(".mlp") and not hasattr(module, "experts"):
            module.forward = _tiled_forward(module, type(module).forward, tile_tokens)
            patched += 1
    return patched


def _tiled_forward(module: torch.nn.Module, forward, tile_tokens: int):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    from launcher.dist import all_reduce

    def tiled(x: torch.Tensor) -> torch.Tensor:
        tiles = all_reduce(torch.tensor([math.ceil(x.shape[-2] / tile_tokens)]), op="max")
        params = [p for p in module.parameters() if p.requires_grad]
        return TiledMLP.apply(forward, module, x, int(tiles), params)
    return tiled
