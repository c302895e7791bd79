"""The fit search of `dpo-ds plan`: the first setting that fits, and the `dpo-ds train` flags that run it."""
from __future__ import annotations

import dataclasses

from dpo_ds.plan.memory import Plan, Setup, plan
from dpo_ds.plan.shapes import ModelShape

NODE_COUNTS_CAP = 64


def smallest_fit(model: ModelShape, setup: Setup, max_nodes: int = NODE_COUNTS_CAP) -> Plan | None:
    """The first setting that fits, on the machines given first: the given node count as is, then with
    optimizer offload, then with optimizer and param offload (starting from the offload flags given, never
    removing one), then each of those with the micro batch halved, down to 1; only then the same search on
    more nodes: 2, 4, ... times up to max_nodes."""
    node_counts = [setup.nodes] + [n for n in (2**k for k in range(max_nodes.bit_length())) if setup.nodes < n <= max_nodes]
    offloads = list(dict.fromkeys([(setup.offload_optimizer, setup.offload_params),
                                   (True, setup.offload_params), (True, True)]))
    micro_batches = [setup.micro_batch_size >> k for k in range(setup.micro_batch_size.bit_length())]
    for nodes in node_counts:
        for micro_batch in micro_batches:
            for offload_optimizer, offload_params in offloads:
                candidate = plan(model, dataclasses.replace(
                    setup, nodes=nodes, micro_batch_size=micro_batch,
                    offload_optimizer=offload_optimizer, offload_params=offload_params))
                if candidate.fits:
                    return candidate
    return None


def longest_seq_len(model: ModelShape, setup: Setup, limit: int = 1 << 24) -> int | None:
    """The longest seq_len (tokens per sequence, a multiple of S) with which `setup` as given fits (memory grows
    with seq_len), up to `limit`; None when not even S tokens fit."""
    step = setup.sequence_parallel_size

    def fits(units: int) -> bool:
        return plan(model, dataclasses.replace(setup, seq_len=units * step)).fits

    low, high = 0, limit // step  # fits(low) (or low = 0), and nothing above high is tried
    if not fits(1):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low * step


# ds_configs preset of each (offload_optimizer, offload_params) setting; params alone have none.
PRESETS_BY_OFFLOAD = {(False, False): "ds_configs/zero3.json", (True, False): "ds_configs/zero3_offload_optimizer.json",
                      (True, True): "ds_configs/zero3_offload_all.json"}
REFERENCE_FLAGS = {"gpu": ["--ref_offload", "false"], "offload": [], "precomputed": ["--precompute_ref", "true"],
                   "none": ["--reference_free", "true"]}


def train_flags(result: Plan) -> list[str]:
    """The `dpo-ds train` flags of a plan's setting (run on its node and GPU counts)."""
    s = result.setup
    preset = PRESETS_BY_OFFLOAD.get((s.offload_optimizer, s.offload_params))
    flags = ["--micro_batch_size", str(s.micro_batch_size), "--max_length", str(s.seq_len), "--precision", s.precision]
    flags += ["--gradient_accumulation_steps", str(s.gradient_accumulation_steps)] if s.gradient_accumulation_steps > 1 else []
    flags += ["--sequence_parallel_size", str(s.sequence_parallel_size)] if s.sequence_parallel_size > 1 else []
    flags += ["--deepspeed_config", preset] if preset else []
    if s.lora_r:  # the reference is the policy's own base: no reference engine to place
        flags += ["--lora_r", str(s.lora_r)] + (["--lora_quantize", s.lora_quantize] if s.lora_quantize else [])
        flags += [] if s.reference in ("gpu", "offload") else REFERENCE_FLAGS[s.reference]
    else:
        flags += REFERENCE_FLAGS[s.reference]
    return flags + ([] if s.fused_lm_head else ["--fused_lm_head", "false"])
