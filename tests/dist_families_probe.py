"""Run under torchrun by tests/test_families.py: train every family of a list in one process group, one after
the other (one launch instead of one per family), and report what only the live processes can see.

Usage: dist_families_probe.py SPEC.json, SPEC = [{"family", "config", "report"}, ...].
Per family, rank 0 writes `report` (torch file): the trained policy's logits on a probe batch (compared with
the exported model by the test) and, for mixture-of-experts models, which experts each rank's tokens reached
in two extra training steps (forward, backward, optimizer step) whose routing is forced to differ between the ranks (rank r: experts
{2r, 2r + 1}); reaching the report at all means ZeRO-3 did not hang on it.
"""
import gc
import json
import sys

import torch
import torch.distributed as dist

from dpo_ds.config import load_config
from dpo_ds.engines import release_engine
from dpo_ds.trainer import train
from launcher.dist import barrier, exit_process, gather_objects

PROBE = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [1, 30, 31, 32, 33, 34, 35, 36]])


def force_routing(model, rank: int) -> tuple[list, set]:
    """Hooks on every router (a module returning (logits, scores, indices)) sending every token of this rank to
    experts 2*rank, 2*rank + 1, ...; returns the hook handles and the set the experts reached are added to."""
    reached: set[int] = set()
    handles = []

    def hook(module, args, output):
        logits, scores, indices = output
        experts = logits.shape[-1]
        forced = (2 * rank + torch.arange(indices.shape[-1], device=indices.device)) % experts
        forced = forced.expand_as(indices).contiguous()
        reached.update(forced.unique().tolist())
        return logits, scores, forced

    for name, module in model.named_modules():
        if name.endswith("mlp.gate") and "Router" in type(module).__name__:
            handles.append(module.register_forward_hook(hook))
    return handles, reached


def run_family(entry: dict) -> None:
    cfg = load_config(entry["config"])
    result = train(cfg)
    run = result.ctx
    policy = run.policy
    report = {"family": entry["family"]}
    policy.eval()
    with torch.no_grad():
        report["logits"] = policy(input_ids=PROBE.to(policy.device)).logits.float().cpu()
    policy.train()
    handles, reached = force_routing(policy.module, dist.get_rank())
    if handles:
        rank = dist.get_rank()
        for _ in range(2):  # forward, backward and optimizer step, each rank on its own experts
            loss = policy(input_ids=PROBE[rank:rank + 1].to(policy.device)).logits.float().logsumexp(-1).mean()
            policy.backward(loss)
            policy.step()
        for handle in handles:
            handle.remove()
        report["experts_reached"] = gather_objects(sorted(reached))
    if dist.get_rank() == 0:
        torch.save(report, entry["report"])
    reference = getattr(run.reference, "engine", None)
    for engine in (policy, reference):
        if engine is not None:
            release_engine(engine)
    del run, result, policy, reference
    gc.collect()
    barrier()


for entry in json.load(open(sys.argv[1])):
    run_family(entry)
barrier()
dist.destroy_process_group()
exit_process(0)  # as the dpo-ds entry point does: no interpreter teardown after gloo
