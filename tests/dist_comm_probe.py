"""Run under torchrun (2 ranks, gloo) by tests/test_comm.py: the communication helpers of launcher.dist and
their users, with a process-group timeout of 3 s. Usage: dist_comm_probe.py OUT_DIR.
Each rank writes OUT_DIR/rank-R.json with what it saw."""
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

import launcher.dist as ld
from dpo_ds import loading, safetensors_io
from dpo_ds.checkpoint import any_rank
from dpo_ds.metrics import PairStats, max_over_ranks
from dpo_ds.parallel import Parallel
from launcher.env import LauncherError

logging.basicConfig(level=logging.INFO)
TIMEOUT_S = 3.0
out = Path(sys.argv[1])
env = ld.init_distributed(timeout_s=TIMEOUT_S)
rank, world = env.rank, env.world_size
seen: dict = {"comm_device": str(ld.comm_device())}

seen["sum"] = ld.all_reduce(torch.tensor([rank + 1.0])).tolist()
seen["max"] = ld.all_reduce(torch.tensor([float(rank), -float(rank)]), "max").tolist()
value = torch.tensor([7.0, 8.0]) if rank == 0 else torch.zeros(2)
ld.broadcast_(value, src=0)
seen["broadcast"] = value.tolist()
received = torch.empty(3)
ld.scatter_(received, [torch.full((3,), float(r)) for r in range(world)] if rank == 0 else None, src=0)
seen["scatter"] = received.tolist()
seen["gathered"] = ld.gather_objects({"rank": rank})
seen["any_rank"] = any_rank(rank == 1)
seen["max_over_ranks"] = max_over_ranks(rank + 0.5)
stats = PairStats(Parallel())
stats.add_step_time(1.0 + rank)
seen["stats_step_time_s"] = stats.reduce()["step_time_s"]

# A phase of rank 0 alone that lasts longer than the process group's timeout: the others must survive it.
ld.PROGRESS_S = 1.0
started = time.monotonic()
seen["on_rank0_result"] = ld.on_rank0("sleeping", lambda: time.sleep(2 * TIMEOUT_S) or {"slept": 2 * TIMEOUT_S})
seen["on_rank0_waited_s"] = time.monotonic() - started
ld.barrier()  # the group still works after the long phase


def fail():
    raise ValueError("disk full")


try:
    ld.on_rank0("failing", fail, failure=KeyError)
except (ValueError, KeyError) as err:
    seen["on_rank0_error"] = f"{type(err).__name__}: {err}"

# Shared-storage check: one shared directory, then a "node-local" cache_dir (each rank its own directory
# under the same config value, as two nodes' local disks would be), with a stale check file on rank 1's.
ld.check_shared_dirs({"output_dir": str(out / "shared")})
seen["shared_ok"] = True
local = out / f"local-{rank}"
local.mkdir(parents=True, exist_ok=True)
if rank == 1:
    (local / ld.SHARED_CHECK_FILE).write_text("left by an earlier run")
try:
    ld.check_shared_dirs({"output_dir": str(out / "shared"), "cache_dir": str(local)})
except LauncherError as err:
    seen["not_shared_error"] = str(err)
seen["check_files_left"] = sorted(p.name for p in (out / "shared").iterdir())

# The streamed loader's scatter, chunk by chunk: a 1001-element tensor over 2 ranks (501 each, the last
# padded by one element, which must stay as it was), 32 elements per rank and chunk.
full = torch.arange(1001, dtype=torch.float32) * 0.5
if rank == 0:
    save_file({"w": full}, str(out / "w.safetensors"))
ld.barrier()
entry = safetensors_io.read_headers({"w": out / "w.safetensors"})["w"]
loading.STAGING_BYTES = 32 * 4 * world
size = 501
part = torch.full((size,), float("nan"))
part.ds_numel = size
loading._load_into_partitions(SimpleNamespace(ds_tensor=part, ds_numel=1001), entry)
expect = torch.full((size,), float("nan"))
valid = full[rank * size:(rank + 1) * size]
expect[: len(valid)] = valid
seen["partition_ok"] = bool(torch.equal(torch.nan_to_num(part, 1e9), torch.nan_to_num(expect, 1e9)))
(out / f"rank-{rank}.json").write_text(json.dumps(seen))
ld.barrier()
torch.distributed.destroy_process_group()
ld.exit_process(0)
