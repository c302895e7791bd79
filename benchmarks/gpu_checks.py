"""GPU-only checks of issue 16 that the CPU suite cannot make (run by benchmarks/gpu.sh, one process).

1. Under NCCL the communication device is this rank's GPU, and the helpers of launcher.dist work with CPU
   tensors given to them (they stage through the GPU).
2. No device-to-host sync in dpo-ds's scoring and statistics of a micro-step
   (torch.cuda.set_sync_debug_mode("error") turns any sync into an exception).
3. release_host_cache gives torch's cached pinned host memory back (after precompute_ref).
Prints one JSON line {"check": ..., "ok": ...} per check; exits 1 if any failed.
"""
from __future__ import annotations

import json
import os
import traceback

import torch


def check_nccl_helpers() -> dict:
    import launcher.dist as ld
    from dpo_ds.checkpoint import any_rank
    from dpo_ds.metrics import PairStats, max_over_ranks
    from dpo_ds.parallel import Parallel

    ld.init_distributed(timeout_s=120)
    import torch.distributed as dist

    stats = PairStats(Parallel())
    stats.add_step_time(2.0)
    result = {"backend": dist.get_backend(), "comm_device": str(ld.comm_device()),
              "sum": ld.all_reduce(torch.tensor([1.0])).tolist(), "any_rank": any_rank(True),
              "max_over_ranks": max_over_ranks(3.0), "stats_device": str(stats.sums.device),
              "step_time_s": stats.reduce()["step_time_s"], "gathered": ld.gather_objects("x")}
    value = torch.tensor([5.0])
    ld.broadcast_(value)
    received = torch.empty(2)
    ld.scatter_(received, [torch.full((2,), 4.0)] * dist.get_world_size())
    ld.barrier()
    result.update(broadcast=value.tolist(), scatter=received.tolist(),
                  shared_rank0=ld.on_rank0("testing", lambda: {"fine": True}))
    ok = (result["comm_device"].startswith("cuda") and result["sum"] == [float(dist.get_world_size())]
          and result["any_rank"] and result["max_over_ranks"] == 3.0 and result["stats_device"].startswith("cuda")
          and result["step_time_s"] == 2.0 and result["broadcast"] == [5.0] and result["scatter"] == [4.0, 4.0]
          and result["shared_rank0"] == {"fine": True})
    dist.destroy_process_group()
    return {"ok": ok, **result}


def check_no_sync_per_micro_step() -> dict:
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dpo_ds.packed_attention import per_sequence
    from dpo_ds.scoring import _varlen_attention_kwargs, to_device
    from dpo_ds.logprobs import head_sequence_logps, scored_positions, sequence_logps
    from dpo_ds.losses import LossOutput, PairLogps
    from dpo_ds.metrics import PairStats
    from dpo_ds.parallel import Parallel

    dev = torch.device("cuda")
    lengths = [300, 500, 200, 400]
    position_ids = torch.tensor([[p for n in lengths for p in range(n)]])
    loss_mask = torch.tensor([[p > n // 3 for n in lengths for p in range(n)]])
    sequence_ids = torch.tensor([[j for j, n in enumerate(lengths) for _ in range(n)]])
    ids = torch.randint(0, 32000, position_ids.shape)
    hidden = torch.randn(1, position_ids.shape[1], 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32000, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids_d, mask_d, seq_d = (to_device(t, dev) for t in (ids, loss_mask, sequence_ids))
        kwargs = _varlen_attention_kwargs(position_ids, dev)
        # sdpa_packed (padding_free without flash-attn) with the bounds forward_logps gives it: none read back
        query = torch.randn(1, 8, position_ids.shape[1], 64, device=dev, dtype=torch.bfloat16)
        key = torch.randn(1, 2, position_ids.shape[1], 64, device=dev, dtype=torch.bfloat16)
        attended, _ = per_sequence(sdpa_attention_forward)(SimpleNamespace(num_key_value_groups=4, is_causal=True),
                                                           query, key, key, None, cu_seq_lens_q=kwargs["cu_seq_lens_q"])
        scored = to_device(scored_positions(loss_mask), dev)
        sums, tokens = head_sequence_logps(hidden, weight, ids_d, mask_d, 256, seq_d, len(lengths), scored=scored)
        sums.sum().backward()
        logits = torch.randn(1, position_ids.shape[1], 1000, device=dev)
        full, _ = sequence_logps(logits, ids_d % 1000, mask_d, 256, seq_d, len(lengths))
        lp = PairLogps(sums[:2].detach(), sums[2:].detach(), full[:2], full[2:], tokens[:2], tokens[2:])
        out = LossOutput(losses=-torch.nn.functional.logsigmoid(lp.policy_chosen - lp.policy_rejected),
                         chosen_rewards=lp.policy_chosen - lp.ref_chosen, rejected_rewards=lp.policy_rejected - lp.ref_rejected)
        stats = PairStats(Parallel(), dev)
        stats.add_pairs(lp, out, real_tokens=position_ids.numel(), padded_tokens=position_ids.numel())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"ok": int(kwargs["max_length_q"]) == max(lengths) and stats.total("pairs") == 2.0
            and attended.shape == (1, position_ids.shape[1], 8, 64)}


def check_pinned_memory_release() -> dict:
    from dpo_ds.engines import release_host_cache

    def held() -> int:  # pinned bytes the caching host allocator owns, in use or cached (torch >= 2.8 names)
        return torch.cuda.host_memory_stats()["allocated_bytes.current"]

    block = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    del block
    cached = held()
    release_host_cache()
    after = held()
    return {"ok": cached >= 256 << 20 and after < cached - (200 << 20), "held_before": cached, "held_after": after}


def main() -> int:
    failed = 0
    for check in (check_nccl_helpers, check_no_sync_per_micro_step, check_pinned_memory_release):
        try:
            result = check()
        except Exception as err:  # report and go on with the next check
            result = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        failed += not result["ok"]
        print(json.dumps({"check": check.__name__, "rank": int(os.environ.get("RANK", 0)), **result}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    from launcher.dist import exit_process

    exit_process(main())
