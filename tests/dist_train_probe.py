"""Run under torchrun by the tests: train, then report what only the live process can see.

Writes (rank 0) a torch file with: the largest change of any reference parameter against the files it was
loaded from, whether any reference parameter requires grad, whether the reference engine has an optimizer,
and the trained policy engine's logits on a probe batch.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import deepspeed
from safetensors.torch import load_file

from dpo_ds.config import load_config
from dpo_ds.trainer import train

cfg = load_config(sys.argv[1])
probe_out = sys.argv[2]
result = train(cfg)
run = result.run
ref = run.reference.engine
original = {}
for shard in sorted(Path(cfg.ref_model_name_or_path or cfg.model_name_or_path).glob("*.safetensors")):
    original.update(load_file(str(shard)))
ref_max_change = 0.0
for name, p in ref.module.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        ref_max_change = max(ref_max_change, float((p.detach().cpu().float() - original[name].float()).abs().max()))
probe = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [1, 30, 31, 32, 33, 34, 35, 36]])
run.policy.eval()
with torch.no_grad():
    logits = run.policy(input_ids=probe.to(run.policy.device)).logits.float().cpu()
if dist.get_rank() == 0:
    torch.save({"ref_max_change": ref_max_change,
                "ref_requires_grad": any(p.requires_grad for p in ref.module.parameters()),
                # DeepSpeed's ZeRO-3 parameter manager (DeepSpeedZeRoOffload) holds no optimizer state
                "ref_optimizer": type(ref.optimizer).__name__ if ref.basic_optimizer is None else "optimizer",
                "ref_offload_device": str(ref.zero_offload_param().device),
                "probe": probe, "logits": logits}, probe_out)
dist.barrier()
dist.destroy_process_group()
