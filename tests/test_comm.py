"""Communication on the right device (finding 1 of issue 16), rank-0-only phases, the shared-storage check.

Under NCCL a process group only has a backend for CUDA tensors, and a collective on a CPU tensor fails on every
rank ("No backend type associated with device type cpu"). CPU tests run gloo, where that cannot show, so:
- no module but launcher/dist.py calls torch.distributed's communication functions (static check);
- a group whose only backend is bound to `cuda` (init_process_group("cuda:gloo")), as an NCCL group is, makes
  every helper and every dpo-ds function that communicates reach for the CUDA device the group names (on this
  CPU-only torch: "Torch not compiled with CUDA"), never hand the group a CPU tensor;
- a real 2-rank gloo run checks the helpers' results, a rank-0 phase longer than the group's timeout, error
  propagation, the shared-storage check and the streamed loader's chunked scatter.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMUNICATION = {"all_reduce", "broadcast", "send", "recv", "isend", "irecv", "batch_isend_irecv", "scatter",
                 "gather", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                 "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "all_gather_object",
                 "broadcast_object_list", "gather_object", "scatter_object_list", "monitored_barrier"}


def test_only_launcher_dist_calls_torch_distributed_communication():
    offenders = []
    for path in sorted([*(REPO / "dpo_ds").glob("*.py"), *(REPO / "launcher").glob("*.py")]):
        if path == REPO / "launcher" / "dist.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in COMMUNICATION and \
                    isinstance(node.value, ast.Name) and node.value.id in ("dist", "torch_dist"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} dist.{node.attr}")
    assert offenders == [], "communicate through launcher.dist's helpers (communication device): " + ", ".join(offenders)


EMULATED_NCCL = r'''
import json, os, sys
import torch, torch.distributed as dist
from launcher.env import free_port
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
dist.init_process_group("cuda:gloo")  # like NCCL: a backend for CUDA tensors only
import launcher.dist as ld
from dpo_ds.checkpoint import any_rank
from dpo_ds.metrics import PairStats, max_over_ranks
from dpo_ds.parallel import Parallel
from dpo_ds import loading
result = {"comm_device": str(ld.comm_device())}
calls = {
    "plain dist.all_reduce of a CPU tensor": lambda: dist.all_reduce(torch.tensor([1.0])),
    "all_reduce": lambda: ld.all_reduce(torch.tensor([1.0])),
    "broadcast_": lambda: ld.broadcast_(torch.zeros(2)),
    "scatter_": lambda: ld.scatter_(torch.zeros(2), [torch.zeros(2)]),
    "gather_objects": lambda: ld.gather_objects({"a": 1}),
    "barrier": ld.barrier,
    "checkpoint.any_rank": lambda: any_rank(True),
    "metrics.max_over_ranks": lambda: max_over_ranks(1.0),
    "metrics.PairStats.reduce": lambda: PairStats(Parallel(), torch.device("cpu")).reduce(),
    "metrics.PairStats()": lambda: PairStats(Parallel()),
    "launcher.dist check": lambda: ld.all_reduce(torch.tensor([1.0])),
}
for name, call in calls.items():
    try:
        call()
        result[name] = "no error"
    except Exception as err:
        result[name] = f"{type(err).__name__}: {err}"
print(json.dumps(result))
'''


@pytest.mark.distributed
def test_collectives_use_the_device_the_group_has_a_backend_for():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", EMULATED_NCCL], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("comm_device") == "cuda:0"
    # the emulation is faithful: what finding 1 saw
    assert "No backend type associated with device type cpu" in result.pop("plain dist.all_reduce of a CPU tensor")
    for name, outcome in result.items():
        assert "not compiled with CUDA" in outcome, f"{name}: {outcome}"


@pytest.mark.distributed
def test_helpers_two_ranks(tmp_path):
    from helpers import launch

    proc = launch([str(REPO / "tests" / "dist_comm_probe.py"), str(tmp_path)], nproc=2, timeout=300)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for rank, seen in enumerate(ranks):
        assert seen["comm_device"] == "cpu"
        assert seen["sum"] == [3.0] and seen["max"] == [1.0, 0.0]
        assert seen["broadcast"] == [7.0, 8.0] and seen["scatter"] == [float(rank)] * 3
        assert seen["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert seen["any_rank"] is True and seen["max_over_ranks"] == 1.5
        assert seen["stats_step_time_s"] == 2.0  # the slowest rank's time
        # rank 0 worked alone for twice the group's 3 s timeout; the others waited and the group still works
        assert seen["on_rank0_result"] == {"slept": 6.0} and seen["on_rank0_waited_s"] >= 5.9
        assert seen["shared_ok"] is True
        assert seen["partition_ok"] is True
        message = seen["not_shared_error"]
        assert message.startswith("cache_dir ") and "output_dir '" not in message
        assert "rank 1" in message and "older check file" in message
        assert seen["check_files_left"] == []
    assert ranks[0]["on_rank0_error"] == "ValueError: disk full"
    assert ranks[1]["on_rank0_error"].startswith("KeyError") and "rank 0 failed while failing: ValueError: disk full" \
        in ranks[1]["on_rank0_error"]
    assert "rank 0 still sleeping" in proc.stderr


STORE_ON_RANK0 = r'''
import sys, time
import launcher.dist as ld
env = ld.init_distributed(timeout_s=60)
result = ld.on_rank0("working", lambda: time.sleep(1.5) or "done")
print(f"rank {env.rank}: {result}", flush=True)
ld.exit_process(0)  # rank 0 leaves at once, taking the store it hosts with it
'''


@pytest.mark.distributed
def test_rank0_hosting_the_store_leaves_only_after_the_others_read_the_outcome():
    """Under srun or mpirun rank 0's process hosts the rendezvous store (torchrun's agent hosts it otherwise):
    a rank still polling for the outcome of a phase when rank 0 exits would fail with 'Connection reset'."""
    from launcher.env import free_port

    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "TORCHELASTIC"))}
        env.update(PYTHONPATH=str(REPO), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", STORE_ON_RANK0], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=300) for p in procs]
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0 and f"rank {rank}: done" in out, err[-3000:]
