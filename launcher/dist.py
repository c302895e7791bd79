"""Initialise torch.distributed / DeepSpeed comms from whatever launcher started us.

    from launcher.dist import init_distributed
    dist_env = init_distributed(timeout_s=600)

`python -m launcher.dist [--timeout S]` runs the same rendezvous plus one all-reduce
and prints one line per rank: a quick "can my ranks see each other" check for a
new cluster, independent of the trainer.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

from launcher.env import DistEnv, LauncherError, resolve


def export(env: DistEnv) -> None:
    """Put the resolved values where torch's env:// init and DeepSpeed look for them."""
    os.environ.update(env.as_environ())


def pick_backend() -> tuple[str, str]:
    """(device, backend): the accelerator's own backend, gloo when running on CPU."""
    import torch
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    backend = accel.communication_backend_name()
    if accel.device_name() == "cpu" and backend == "ccl":
        # DeepSpeed picks ccl on CPU only when oneccl_bindings_for_pytorch is importable;
        # check anyway, since a half-installed oneCCL fails much later and less clearly.
        try:
            import oneccl_bindings_for_pytorch  # noqa: F401
        except ImportError:
            backend = "gloo"
    device = "cuda" if accel.device_name() == "cuda" and torch.cuda.is_available() else accel.device_name()
    return device, backend


def barrier() -> None:
    """Wait for every rank; a no-op in a single process without a process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def exit_process(code: int) -> None:
    """Flush, finalize MPI if it was started, and leave without interpreter teardown: after a gloo process
    group, finalization can abort in C++ ("terminate called without an active exception") even after
    destroy_process_group, which would turn a finished run into a failed one."""
    import logging

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def init_distributed(timeout_s: float = 600) -> DistEnv:
    """Resolve the environment, export it, select the device and join the process group.

    Raises LauncherError if the environment is incomplete or the rendezvous does not
    complete within `timeout_s` (e.g. another rank never started): never hangs forever.
    """
    env = resolve(os.environ)
    export(env)

    import deepspeed
    import torch

    device, backend = pick_backend()
    if device == "cuda":
        # Before any CUDA work, so NCCL and every allocation land on this rank's GPU.
        # A site that binds one GPU per task (srun --gpus-per-task=1) shows each rank
        # a single device 0; otherwise every rank sees the node's GPUs.
        visible = torch.cuda.device_count()
        if visible == 1:
            torch.cuda.set_device(0)
        elif env.local_rank < visible:
            torch.cuda.set_device(env.local_rank)
        else:
            raise LauncherError(f"local rank {env.local_rank} but only {visible} GPU(s) visible "
                                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                                f"run one process per GPU")

    started = time.monotonic()
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s), init_method="env://")
    except Exception as e:  # torch raises DistStoreError / RuntimeError / DistNetworkError here
        waited = time.monotonic() - started
        if env.rank == 0:
            what = (f"for the other {env.world_size - 1} rank(s) to connect to its store at "
                    f"{env.master_addr}:{env.master_port}")
        else:
            what = f"to reach rank 0 at {env.master_addr}:{env.master_port}"
        raise LauncherError(
            f"rendezvous failed: rank {env.rank} of {env.world_size} (local rank {env.local_rank}, "
            f"host {socket.gethostname()}, {env.source}) waited {waited:.0f}s (timeout {timeout_s:g}s) {what}; "
            f"backend {backend}. Did every rank start, and can all hosts reach that address? "
            f"Cause: {type(e).__name__}: {e}") from e
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.dist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=120, help="rendezvous timeout in seconds")
    args = parser.parse_args(argv)
    try:
        env = init_distributed(timeout_s=args.timeout)
    except LauncherError as e:
        print(f"launcher: error: {e}", file=sys.stderr, flush=True)
        return 1
    import torch
    import torch.distributed as dist

    total = torch.tensor([env.rank + 1.0])
    dist.all_reduce(total)  # sum of 1..world_size proves every rank took part
    print(f"launcher: {env.describe()} host={socket.gethostname()} "
          f"allreduce={int(total.item())} expected={env.world_size * (env.world_size + 1) // 2}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
