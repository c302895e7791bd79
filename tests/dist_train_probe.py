"""Run under torchrun by the tests: train, then report what only the live process can see.

Usage: dist_train_probe.py CONFIG OUT [field value ...] (config overrides), or
       dist_train_probe.py --runs SPEC.json, SPEC = [[CONFIG, OUT], ...]: train each config in turn in the one
       process group (one launch instead of one per config); before each run rank 0 writes the line
       PROBE_RUN_MARKER + OUT to stderr so that a test can read each run's own output (helpers.launch_probe_runs).
       An entry [["eval", ARG, ...], OUT] runs `dpo-ds eval ARG ...` there instead (its command function, in the
       same process group); OUT then holds its summary and its sharded forwards (probe_eval).
Writes (rank 0) a torch file with: how many DeepSpeed engines the run left in the process, the reference source's
type and, when there is a reference engine, the largest change of any reference parameter against the files
it was loaded from, whether any reference parameter requires grad, the reference engine's optimizer type and
offload device, and the trained policy engine's logits on a probe batch.
"""
import argparse
import gc
import json
import os
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import deepspeed
from safetensors.torch import load_file

from dpo_ds import evaluate, sequence_parallel
from dpo_ds.config import load_config
from dpo_ds.engines import models as engine_models
from dpo_ds.engines import release_engine
from dpo_ds.trainer import train
from helpers import PROBE_RUN_MARKER
from launcher.dist import barrier, exit_process


if os.environ.get("PROBE_TILE_TOKENS"):  # tiled_mlp with tiles this small, so that the tests' short sequences are cut
    _enable_tiled_mlp = engine_models.enable_tiled_mlp
    engine_models.enable_tiled_mlp = lambda model: _enable_tiled_mlp(model, int(os.environ["PROBE_TILE_TOKENS"]))


def live_engines() -> list:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, deepspeed.DeepSpeedEngine)]


def probe_run(cfg, probe_out: str, release: bool) -> None:
    # engines of earlier runs in this process that DeepSpeed still holds are not this run's
    earlier = weakref.WeakSet(live_engines())
    result = train(cfg)
    run = result.ctx
    policy = run.policy
    report = {"deepspeed_engines": sum(e not in earlier for e in live_engines()),
              "reference": type(run.reference).__name__,
              # scoring.scoring_head of the policy: the Linear scored inside, or None
              "fused_head": run.policy_head is not None,
              "attention": [e.module.config._attn_implementation
                            for e in (policy, getattr(run.reference, "engine", None)) if e],
              # HF checkpoints activations only in train mode
              "policy_checkpointing": policy.module.is_gradient_checkpointing and policy.module.training,
              # MLP blocks computed in sequence tiles (tiled_mlp: sequence_parallel.enable_tiled_mlp's wrapper)
              "tiled_mlp_blocks": sum(getattr(m.forward, "__name__", "") == "tiled" for m in policy.module.modules()),
              # what DeepSpeed itself resolved from our "auto" values
              "policy_resolved": {"reduce_bucket_size": policy.zero_reduce_bucket_size(),
                                  "prefetch_bucket_size": policy.zero_prefetch_bucket_size(),
                                  "param_persistence_threshold": policy.zero_param_persistence_threshold(),
                                  "gradient_clipping": policy.gradient_clipping(),
                                  "micro_batch": policy.train_micro_batch_size_per_gpu(),
                                  "grad_accum": policy.gradient_accumulation_steps(),
                                  "train_batch": policy.train_batch_size(),
                                  "zero_stage": policy.zero_optimization_stage(),
                                  "bf16": policy.bfloat16_enabled(),
                                  "optimizer_groups": [(g["lr"], g["weight_decay"])
                                                       for g in policy.optimizer.param_groups],
                                  "optimizer": type(policy.basic_optimizer).__name__,
                                  "optimizer_fused": policy.basic_optimizer.defaults.get("fused")},
              # QLoRA: each 4-bit packed base weight as ZeRO-3 holds it: (full numel, this rank's partition, requires grad)
              "nf4_weights": [(p.ds_numel, p.ds_tensor.numel(), p.requires_grad) for p in policy.module.parameters()
                              if type(p).__name__ == "Params4bit"]}
    ref = getattr(run.reference, "engine", None)  # None for reference-free losses: nothing more to inspect
    if ref is not None and ref is not policy:  # LoRA: the reference is the policy engine itself (adapter off)
        original = {}
        for shard in sorted(Path(cfg.ref_model_name_or_path or cfg.model_name_or_path).glob("*.safetensors")):
            original.update(load_file(str(shard)))
        ref_max_change = 0.0
        for name, p in ref.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                ref_max_change = max(ref_max_change,
                                     float((p.detach().cpu().float() - original[name].float()).abs().max()))
        report.update({"ref_max_change": ref_max_change,
                       "ref_requires_grad": any(p.requires_grad for p in ref.module.parameters()),
                       # DeepSpeed's ZeRO-3 parameter manager (DeepSpeedZeRoOffload) holds no optimizer state
                       "ref_optimizer": type(ref.optimizer).__name__ if ref.basic_optimizer is None else "optimizer",
                       "ref_offload_device": str(getattr(ref.zero_offload_param(), "device", None)),
                       "ref_zero_stage": ref.zero_optimization_stage()})
    if ref is not None:
        probe = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [1, 30, 31, 32, 33, 34, 35, 36]])
        policy.eval()
        with torch.no_grad():
            report.update(probe=probe, logits=policy(input_ids=probe.to(policy.device)).logits.float().cpu())
    if dist.get_rank() == 0:
        torch.save(report, probe_out)
    if release:  # another run follows in this process
        for engine in {id(e): e for e in (policy, ref) if e is not None}.values():
            release_engine(engine)
        del run, result, policy, ref
        gc.collect()
    barrier()


def probe_eval(argv: list[str], probe_out: str) -> None:
    """`dpo-ds eval ARGV`; rank 0 saves the summary it printed and how many of its forwards scored a shard of a
    sequence-parallel group (sequence_parallel.BatchScorer at S > 1)."""
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    printed, sharded = [], []
    evaluate.emit = printed.append
    shard_forward = sequence_parallel.shard_forward_logps

    def counted(engine, shard, *args, **kwargs):
        sharded.append(tuple(shard.input_ids.shape))
        return shard_forward(engine, shard, *args, **kwargs)

    sequence_parallel.shard_forward_logps = counted
    try:
        evaluate.run(parser.parse_args(argv))
    finally:
        sequence_parallel.shard_forward_logps = shard_forward
    if dist.get_rank() == 0:
        torch.save({"summary": json.loads(printed[0]), "sharded_forwards": sharded}, probe_out)
    barrier()


if sys.argv[1] == "--runs":
    for config, probe_out in json.load(open(sys.argv[2])):
        barrier()  # every rank has written all of the previous run's output
        if os.environ["RANK"] == "0":  # from the environment: no process group before the first run
            print(PROBE_RUN_MARKER + probe_out, file=sys.stderr, flush=True)
        if isinstance(config, list) and config[0] == "eval":
            probe_eval(config[1:], probe_out)
        else:
            probe_run(load_config(config), probe_out, release=True)
else:
    probe_run(load_config(sys.argv[1], dict(zip(sys.argv[3::2], sys.argv[4::2]))), sys.argv[2], release=False)
dist.destroy_process_group()
exit_process(0)  # as the dpo-ds entry point does: no interpreter teardown after gloo
