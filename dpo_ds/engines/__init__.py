"""DeepSpeed engines: the policy (trained) and the reference source (frozen).

- `ds_config`: the engines' DeepSpeed configs, presets filled from the run config;
- `stage`: the policy's ZeRO stage (zero_stage: auto picks the lowest that fits the device);
- `accelerator`: DeepSpeed's accelerator as the engines use it (the CPU device count taken once);
- `models`: loading a model ZeRO-3 partitioned (weights streamed into the partitions: dpo_ds.loading) and
  preparing it for the run;
- `lifecycle`: building the policy and inference engines, in the same order on every rank, and releasing them.

Scoring a batch with an engine is dpo_ds.scoring's.
"""
from dpo_ds.engines.ds_config import policy_zero_stage, resolve_policy_config, resolve_reference_config
from dpo_ds.engines.lifecycle import (
    PolicyEngine,
    build_inference_engine,
    build_policy_engine,
    release_engine,
    release_host_cache,
)
from dpo_ds.engines.models import (attention_kernel, disable_dropout, load_sharded_model, mark_expert_blocks, model_dtype,
                                   resolve_padding_free)

__all__ = ["PolicyEngine", "attention_kernel", "build_inference_engine", "build_policy_engine", "disable_dropout",
           "load_sharded_model", "mark_expert_blocks", "model_dtype", "policy_zero_stage", "release_engine",
           "release_host_cache", "resolve_padding_free", "resolve_policy_config", "resolve_reference_config"]
