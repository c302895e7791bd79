"""DeepSpeed's accelerator as the engines use it."""
from __future__ import annotations

from deepspeed.accelerator import get_accelerator


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def count_cpu_devices_once() -> None:
    """Make DeepSpeed's CPU accelerator count its devices once.

    Its `device_count()` (NUMA nodes) runs `numactl` in a subprocess on every call unless LOCAL_SIZE is set, and
    ZeRO's gradient reduction calls it for every bucket, every step. Setting LOCAL_SIZE is no fix: with it equal
    to the world size DeepSpeed's CPU backend switches to its shared-memory allreduce, whose /dev/shm segment
    (66 MB per rank) it never unlinks. The count cannot change while a process runs, so it is taken once and
    the accelerator answers from it."""
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" or "device_count" in vars(accelerator):
        return
    count = accelerator.device_count()
    accelerator.device_count = lambda: count
