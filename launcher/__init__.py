"""The only code between a scheduler (torchrun, deepspeed, Slurm, MPI) and the trainer.

- `launcher.env.resolve(environ)` -> `DistEnv`: who am I, pure and cheap.
- `launcher.dist.init_distributed(timeout_s)`: resolve, export, pick device/backend, rendezvous.
- `python -m launcher <dpo-ds args>`: resolve + export, then run the dpo-ds CLI.
"""
from launcher.env import DistEnv, LauncherError

__all__ = ["DistEnv", "LauncherError"]
