"""The parallel context: who this process is in the job and with whom it shares work, built once per run.

    parallel = Parallel.init(timeout_s=cfg.dist_timeout_s)   # joins the process group (launcher.dist)

Ranks are laid out data-parallel x sequence-parallel: the S ranks of one sequence-parallel group (consecutive
global ranks) share every sequence of the micro-batches they read, and the world / S data-parallel groups read
different micro-batches. "Which data a rank reads" is its data-parallel rank; a quantity summed over examples
(metrics, guards) is summed over one data-parallel group, so that every example counts once. With S = 1 (the
default) the data-parallel group is the whole job and the sequence-parallel group is each rank alone.

The collectives themselves are launcher.dist's (on the device the process group communicates); the context only
says which group a reduction runs over.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from dpo_ds.compiled_ops import reporting_op_builds
from dpo_ds.config.errors import ConfigError
from launcher import dist as comm

T = TypeVar("T")


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world_size: int = 1
    sequence_parallel_size: int = 1
    # process groups; None where the group is the whole job (or there is no process group)
    data_parallel_group: Any = field(default=None, compare=False, repr=False)
    sequence_parallel_group: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def init(cls, timeout_s: float, sequence_parallel_size: int = 1) -> Parallel:
        """Join the job's process group (launcher.dist.init_distributed: any launcher, bounded by `timeout_s`) and
        build the data- and sequence-parallel groups. `sequence_parallel_size` must divide the world size."""
        with reporting_op_builds():  # DeepSpeed loads its JIT ops as the group starts
            env = comm.init_distributed(timeout_s=timeout_s)
        s = sequence_parallel_size
        # the other settings S needs are checked before loading (sequence_parallel.check_settings)
        if env.world_size % s:
            raise ConfigError(f"field 'sequence_parallel_size': {s} does not divide the world size {env.world_size} "
                              f"(data-parallel groups are S consecutive ranks)", "sequence_parallel_size")
        if s == 1:
            return cls(env.rank, env.world_size)
        # every rank creates every group, in the same order (torch.distributed.new_group's rule)
        sp_groups = [comm.new_group(list(range(d * s, (d + 1) * s))) for d in range(env.world_size // s)]
        dp_groups = [comm.new_group(list(range(r, env.world_size, s))) for r in range(s)]
        return cls(env.rank, env.world_size, s, dp_groups[env.rank % s], sp_groups[env.rank // s])

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.sequence_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.sequence_parallel_size

    @property
    def sequence_parallel_rank(self) -> int:
        return self.rank % self.sequence_parallel_size

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that logs, writes the metrics and publishes what all ranks wrote."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The device whose tensors the process group communicates (launcher.dist.comm_device)."""
        return comm.comm_device()

    def sum_over_data(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`tensor` summed (or maxed) over this rank's data-parallel group: each example once."""
        return comm.all_reduce(tensor, op, group=self.data_parallel_group)

    def gather_over_data(self, obj) -> list:
        """[obj of each rank of this data-parallel group, in order]."""
        return comm.gather_objects(obj, group=self.data_parallel_group)

    def barrier(self) -> None:
        comm.barrier()

    def on_rank0(self, what: str, work: Callable[[], T], failure: type[Exception] = RuntimeError) -> T:
        """`work()` on rank 0 alone, the others waiting while rank 0 lives (launcher.dist.on_rank0)."""
        return comm.on_rank0(what, work, failure)

    def check_shared_dirs(self, dirs: dict[str, str]) -> None:
        """Stop unless every rank sees the same directories (launcher.dist.check_shared_dirs)."""
        comm.check_shared_dirs(dirs)
