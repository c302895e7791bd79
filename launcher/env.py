"""Work out who this process is in a distributed job, from whatever started it.

`resolve(environ)` is a pure function of the environment (plus two injectable
callables for the bits that need the outside world), so every launcher can be
tested from a synthetic dict.  It understands, in this order of precedence:

1. **torchrun / the `deepspeed` launcher** - RANK, LOCAL_RANK, WORLD_SIZE,
   MASTER_ADDR, MASTER_PORT (+ LOCAL_WORLD_SIZE, or the deepspeed launcher's
   LOCAL_SIZE).  These win over everything else: under Slurm with one task per
   node that runs torchrun, the SLURM_* variables describe the torchrun agent,
   not the trainer rank.  In a Slurm task they count only with a mark of the
   launcher that set them (TORCHELASTIC_RUN_ID, LOCAL_SIZE, DPO_DS_DIST_SOURCE):
   without one they were inherited from the submitting shell and are ignored.
2. **Open MPI's mpirun** - OMPI_COMM_WORLD_RANK.  It beats SLURM_* because an
   mpirun inside an allocation starts its daemons through srun, so SLURM_PROCID
   would be the daemon's id, not the rank.
3. **Slurm, one task per GPU** - SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and
   the tasks-per-node variables, in a task started by srun (SLURM_STEP_ID set;
   the batch shell itself, which has SLURM_PROCID=0 but no step, is a single
   process whatever --ntasks says).  Master = first host of the step's nodelist
   (expanded with `scontrol show hostnames`), port = 20000 + job id % 10000.
   MASTER_ADDR / MASTER_PORT in the environment override both.
4. **Other MPIs / PMI** - PMI_RANK or PMIX_RANK without Slurm (or with a PMI_SIZE
   that disagrees with SLURM_NTASKS, i.e. a Hydra mpirun that used srun only to
   start its proxies).  Under plain `srun --mpi=pmix` the PMI variables are a
   side effect of srun and Slurm's own variables are used: no MPI_Init needed.
   Rank and size come from mpi4py; rank 0 broadcasts the master address and port.
5. **Nothing at all** - a single process on 127.0.0.1 with a free port.

Anything in between (say RANK without WORLD_SIZE) is a `LauncherError` that names
the missing variables and the launcher the environment looked like.

This module is the only place in the project that reads SLURM_*, OMPI_* and PMI_*.
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Protocol, Sequence

# Exported next to RANK & co. by `DistEnv.as_environ()` so a second `resolve()` in a
# child (or in the trainer after `python -m launcher` exported everything) reports
# where the values originally came from instead of "torchrun".
SOURCE_VAR = "DPO_DS_DIST_SOURCE"

SOURCES = ("single", "torchrun", "slurm", "mpi", "local")  # local: launcher.local

# Slurm jobs get a port derived from the job id so every task computes the same one
# without talking to the others; keep it above the privileged range and below the
# usual Linux ephemeral range (32768-60999) so it rarely collides with clients.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
# Set by a launcher that started this process inside a Slurm step: torchrun's agent, the deepspeed launcher,
# `python -m launcher` (after resolving once).
STEP_LAUNCHER_MARKERS = ("TORCHELASTIC_RUN_ID", "LOCAL_SIZE", SOURCE_VAR)


# What every rank the launcher starts (`python -m launcher`, launcher.local) gets unless its environment sets it:
# torch's C++ log from ERROR up. At torch's default, WARNING, its TCPStore client prints a warning with a C++ stack
# dump when rank 0 dies during a store request of a rank waiting in launcher.dist.on_rank0, before that rank's one
# line saying rank 0 was lost. C++ errors still show; TORCH_CPP_LOG_LEVEL=WARNING brings the warnings back.
RANK_DEFAULTS = {"TORCH_CPP_LOG_LEVEL": "ERROR"}


def rank_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The RANK_DEFAULTS that `environ` does not set (torch reads them when it is imported: set them before)."""
    return {name: value for name, value in RANK_DEFAULTS.items() if name not in environ}


class LauncherError(RuntimeError):
    """The environment does not describe a usable distributed job."""
    every_rank = True  # an error only some ranks may see (their environment, their rendezvous): each one says it


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # one of SOURCES

    def as_environ(self) -> dict[str, str]:
        """The torchrun-style variables that torch.distributed's env:// init reads."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            SOURCE_VAR: self.source,
        }

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}) "
                f"via {self.source}, master {self.master_addr}:{self.master_port}")


# --------------------------------------------------------------------------- outside world
class MpiWorld(Protocol):
    """What `resolve` needs from MPI; `mpi4py_world()` is the real one, tests pass fakes."""
    rank: int
    size: int
    local_rank: int
    local_size: int

    def bcast(self, obj, root: int = 0): ...


def scontrol_hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist ("gpu[01-03],cpu7") the way Slurm itself does."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             check=True, capture_output=True, text=True, timeout=60).stdout
        return out.split()
    # No Slurm client on this host (e.g. a container on the node): common forms only.
    return expand_hostlist(nodelist)


def expand_hostlist(nodelist: str) -> list[str]:
    """Pure-Python fallback for simple hostlists: "a[1-3,07],b2" -> a1 a2 a3 a07 b2."""
    hosts: list[str] = []
    for prefix, ranges, suffix in re.findall(r"([^,\[\]]*)(?:\[([^\]]*)\])?([^,\[\]]*)(?:,|$)", nodelist):
        if not (prefix or ranges or suffix):
            continue
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts


class _Mpi4pyWorld:
    def __init__(self):
        from mpi4py import MPI  # initialises MPI: only imported when the job is an MPI job

        comm = MPI.COMM_WORLD
        self._comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()

    def bcast(self, obj, root: int = 0):
        return self._comm.bcast(obj, root=root)


def mpi4py_world() -> MpiWorld:
    try:
        return _Mpi4pyWorld()
    except ImportError as e:
        raise LauncherError(f"this looks like an MPI job but mpi4py cannot be imported: {e}") from e


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def slurm_port(job_id: int) -> int:
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


# --------------------------------------------------------------------------- resolution
def resolve(environ: Mapping[str, str],
            scontrol: Callable[[str], Sequence[str]] = scontrol_hostnames,
            mpi: Callable[[], MpiWorld] = mpi4py_world) -> DistEnv:
    kind = detect(environ)
    if kind == "torchrun":
        env = _from_torchrun(environ)
    elif kind == "slurm":
        env = _from_slurm(environ, scontrol)
    elif kind == "mpi":
        env = _from_mpi(environ, mpi)
    else:
        env = DistEnv(0, 0, 1, 1, environ.get("MASTER_ADDR", "127.0.0.1"),
                      _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else free_port(),
                      "single")
    _validate(env)
    return env


def detect(environ: Mapping[str, str]) -> str:
    """Which launcher started us (see the module docstring for the precedence)."""
    # The batch shell of an sbatch job has SLURM_PROCID=0 but no step id: only srun
    # starts tasks, so a process there is alone whatever --ntasks the job asked for.
    in_step = "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ
    slurm_task = any(v in environ for v in SLURM_VARS) and (in_step or "SLURM_JOB_ID" not in environ)
    # MASTER_ADDR/MASTER_PORT alone do not count: users set them as overrides for Slurm/MPI.
    # In a Slurm task, RANK & co count only when a launcher inside the step set them: sbatch passes on the
    # submitting shell's environment, where they can be left over from an earlier torchrun.
    if any(v in environ for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) and \
            (not slurm_task or any(v in environ for v in STEP_LAUNCHER_MARKERS)):
        return "torchrun"
    if "OMPI_COMM_WORLD_RANK" in environ:
        return "mpi"
    pmi = "PMI_RANK" in environ or "PMIX_RANK" in environ
    if slurm_task:
        if pmi and "PMI_SIZE" in environ and environ["PMI_SIZE"] != environ.get("SLURM_NTASKS"):
            return "mpi"  # Hydra-style mpirun that used srun only for its proxies
        return "slurm"
    if pmi:
        return "mpi"
    return "single"


def _missing(environ: Mapping[str, str], names: Sequence[str | tuple[str, ...]], looks_like: str) -> None:
    """Raise if any required variable (or every alternative of a tuple) is absent."""
    missing = [" or ".join(n) if isinstance(n, tuple) else n
               for n in names
               if not any(environ.get(v, "") != "" for v in (n if isinstance(n, tuple) else (n,)))]
    if missing:
        present = sorted(v for v in environ
                         if v in TORCHRUN_VARS or v in SLURM_VARS or v.startswith(("OMPI_COMM_WORLD", "PMI")))
        raise LauncherError(
            f"incomplete distributed environment: it looks like {looks_like} "
            f"(found {', '.join(present) or 'no rank variables'}) but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Set them, or unset the partial set to run "
            f"as a single process.")


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LauncherError(f"{name}={environ[name]!r} is not an integer") from None


def _source(environ: Mapping[str, str], default: str) -> str:
    src = environ.get(SOURCE_VAR, default)
    return src if src in SOURCES else default


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    _missing(environ, TORCHRUN_VARS, "torchrun or the deepspeed launcher")
    world = _int(environ, "WORLD_SIZE")
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; hand-made
    # environments often set neither, and then the job is assumed to be on one node.
    local_var = next((v for v in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if environ.get(v)), None)
    return DistEnv(rank=_int(environ, "RANK"), local_rank=_int(environ, "LOCAL_RANK"), world_size=world,
                   local_world_size=_int(environ, local_var) if local_var else world,
                   master_addr=environ["MASTER_ADDR"], master_port=_int(environ, "MASTER_PORT"),
                   source=_source(environ, "torchrun"))


def _tasks_on_node(spec: str, node_id: int) -> int:
    """SLURM_TASKS_PER_NODE is "2(x3),1": 2 tasks on each of the first 3 nodes, then 1."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise LauncherError(f"cannot parse Slurm tasks-per-node value {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise LauncherError(f"SLURM_NODEID={node_id} is outside tasks-per-node {spec!r}")
    return counts[node_id]


def _from_slurm(environ: Mapping[str, str], scontrol: Callable[[str], Sequence[str]]) -> DistEnv:
    looks = "a Slurm task started by srun"
    required: list[str | tuple[str, ...]] = ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
                                             ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE",
                                              "SLURM_TASKS_PER_NODE")]
    if not environ.get("MASTER_ADDR"):
        required.append(("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    if not environ.get("MASTER_PORT"):
        required.append(("SLURM_JOB_ID", "SLURM_JOBID"))
    _missing(environ, required, looks)

    # Prefer the step's view: an srun inside a bigger allocation may use fewer tasks/nodes.
    if environ.get("SLURM_STEP_TASKS_PER_NODE") or not environ.get("SLURM_NTASKS_PER_NODE"):
        spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ["SLURM_TASKS_PER_NODE"]
        node_id = _int(environ, "SLURM_NODEID") if environ.get("SLURM_NODEID") else 0
        local_world = _tasks_on_node(spec, node_id)
    else:
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE")

    if environ.get("MASTER_ADDR"):
        addr = environ["MASTER_ADDR"]
    else:
        nodelist = next(environ[v] for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                        if environ.get(v))
        hosts = list(scontrol(nodelist))
        if not hosts:
            raise LauncherError(f"could not expand Slurm nodelist {nodelist!r}")
        addr = hosts[0]  # block distribution: task 0 runs on the first node of the step
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT")
    else:
        port = slurm_port(_int(environ, "SLURM_JOB_ID" if environ.get("SLURM_JOB_ID") else "SLURM_JOBID"))
    return DistEnv(rank=_int(environ, "SLURM_PROCID"), local_rank=_int(environ, "SLURM_LOCALID"),
                   world_size=_int(environ, "SLURM_NTASKS"), local_world_size=local_world,
                   master_addr=addr, master_port=port, source="slurm")


def _from_mpi(environ: Mapping[str, str], mpi: Callable[[], MpiWorld]) -> DistEnv:
    world = mpi()
    # Rank 0 decides and broadcasts, so every rank agrees even if environments differ.
    mine = None
    if world.rank == 0:
        mine = (environ.get("MASTER_ADDR") or socket.gethostname(),
                _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else free_port(""))
    addr, port = world.bcast(mine, root=0)
    return DistEnv(rank=world.rank, local_rank=world.local_rank, world_size=world.size,
                   local_world_size=world.local_size, master_addr=addr, master_port=port, source="mpi")


def _validate(env: DistEnv) -> None:
    problems = []
    if env.world_size < 1:
        problems.append(f"world size {env.world_size} < 1")
    if not 0 <= env.rank < env.world_size:
        problems.append(f"rank {env.rank} outside [0, {env.world_size})")
    if not 1 <= env.local_world_size <= env.world_size:
        problems.append(f"local world size {env.local_world_size} outside [1, {env.world_size}]")
    if not 0 <= env.local_rank < env.local_world_size:
        problems.append(f"local rank {env.local_rank} outside [0, {env.local_world_size})")
    if not 0 < env.master_port < 65536:
        problems.append(f"master port {env.master_port} outside 1-65535")
    if not env.master_addr:
        problems.append("empty master address")
    if problems:
        raise LauncherError(f"inconsistent {env.source} environment: " + "; ".join(problems))


def bind_gpu(env: DistEnv, visible: int, environ: Mapping[str, str]) -> DistEnv:
    """`env` with local_rank = the index of this rank's GPU among the `visible` ones this process sees.

    DeepSpeed uses LOCAL_RANK as the CUDA device index (init_process_group's device_id, the engine,
    zero.Init). A site that binds one GPU per task (srun --gpus-per-task=1, --gpu-bind, a per-task
    CUDA_VISIBLE_DEVICES) shows each task a single device 0 while SLURM_LOCALID still counts the node's
    tasks: then the local rank becomes 0. Otherwise every rank sees the node's GPUs and keeps its local rank.
    """
    where = f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')!r}"
    if visible < 1:
        raise LauncherError(f"rank {env.rank}: no GPU visible ({where}) although the accelerator is CUDA")
    if visible == 1:
        return replace(env, local_rank=0)
    if env.local_rank >= visible:
        raise LauncherError(f"local rank {env.local_rank} but only {visible} GPU(s) visible ({where}); "
                            f"run one process per GPU")
    return env


def strip_local_rank(argv: list[str]) -> tuple[list[str], str | None]:
    """The `deepspeed` launcher appends --local_rank=N; LOCAL_RANK in the env says the same."""
    out, local_rank, skip = [], None, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        m = re.fullmatch(r"--local[_-]rank(?:=(\d+))?", arg)
        if m and (m.group(1) is not None or i + 1 < len(argv)):
            local_rank = m.group(1) if m.group(1) is not None else argv[i + 1]
            skip = m.group(1) is None
            continue
        out.append(arg)
    return out, local_rank
