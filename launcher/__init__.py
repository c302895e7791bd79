"""The only code between a scheduler (torchrun, deepspeed, Slurm, MPI) and the trainer.

- `launcher.env.resolve(environ)` -> `DistEnv`: who am I, pure and cheap.
- `launcher.dist.init_distributed(timeout_s)`: resolve, export, pick device/backend, rendezvous.
- `launcher.dist.all_reduce / broadcast_ / scatter_ / gather_objects / barrier`: every collective of dpo-ds,
  on the device the process group communicates (`comm_device()`: the GPU under NCCL, CPU under gloo).
- `launcher.dist.on_rank0(what, work)`: a phase rank 0 does alone, the others waiting as long as rank 0's heartbeat
  goes on.
- `launcher.dist.check_shared_dirs({field: path})`: stop unless every rank sees the same directories.
- `python -m launcher <dpo-ds args>`: resolve + export, then run the dpo-ds CLI.
- `launcher.local.run_local_ranks(n, command)`: N ranks of a command on this machine (`dpo-ds train
  --nproc_per_node N`), ending with its status.
"""
from launcher.env import DistEnv, LauncherError

__all__ = ["DistEnv", "LauncherError"]
