"""Initialise torch.distributed / DeepSpeed comms from whatever launcher started us, and communicate.

    from launcher.dist import init_distributed
    dist_env = init_distributed(timeout_s=600)

Every collective of dpo-ds goes through this module's helpers (all_reduce, broadcast_, scatter_,
gather_objects, barrier), which put tensors on the device the process group has a backend for; phases that
rank 0 does alone go through on_rank0, which keeps the other ranks out of any timed collective.

`python -m launcher.dist [--timeout S]` runs the same rendezvous plus one all-reduce
and prints one line per rank: a quick "can my ranks see each other" check for a
new cluster, independent of the trainer.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

from launcher.env import DistEnv, LauncherError, bind_gpu, resolve

logger = logging.getLogger("dpo_ds")
T = TypeVar("T")


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


# --------------------------------------------------------------------------- communication
# Every collective and point-to-point op of dpo-ds goes through the helpers below (tests/test_comm.py checks
# that no other module calls torch.distributed's communication functions). A process group only has a
# backend for the device types it was created for: under NCCL a CPU tensor fails with "No backend type
# associated with device type cpu", under gloo on CPU an accelerator tensor would.
_REDUCE_OPS = ("sum", "max")


def _grouped() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def process_world_size() -> int:
    """Processes in the default process group; 1 without one (single process)."""
    import torch.distributed as dist

    return dist.get_world_size() if _grouped() else 1


def process_rank() -> int:
    """This process's rank in the default process group; 0 without one (single process)."""
    import torch.distributed as dist

    return dist.get_rank() if _grouped() else 0


def local_world_size() -> int:
    """Processes of the job on this node (LOCAL_WORLD_SIZE, which `export` sets from any launcher); 1 without a
    process group."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if _grouped() else 1


def comm_device():
    """The device whose tensors the default process group communicates: CPU when the group has a CPU backend
    (gloo, or no group at all), else this rank's accelerator (NCCL: the GPU init_distributed selected)."""
    import torch
    import torch.distributed as dist

    if not _grouped():
        return torch.device("cpu")
    types = [d.type for d in dist.group.WORLD._device_types]
    if "cpu" in types:
        return torch.device("cpu")
    kind = types[0]
    module = getattr(torch, kind, None)
    index = module.current_device() if module is not None and module.is_available() else 0
    return torch.device(kind, index)


def all_reduce(tensor, op: str = "sum", group=None):
    """The sum (or max) of `tensor` over every rank of `group` (default: all), as a new tensor on `tensor`'s
    device; `tensor` itself without a process group. A collective: every rank of the group must call it."""
    import torch.distributed as dist

    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {_REDUCE_OPS}, not {op!r}")
    if not _grouped():
        return tensor
    staged = tensor.to(comm_device(), copy=True)
    dist.all_reduce(staged, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return staged.to(tensor.device)


def broadcast_(tensor, src: int = 0) -> None:
    """Overwrite `tensor` on every rank with rank `src`'s (in place, staged through the communication
    device when `tensor` lives elsewhere)."""
    import torch.distributed as dist

    if not _grouped():
        return
    device = comm_device()
    staged = tensor if tensor.device == device else tensor.to(device)
    dist.broadcast(staged, src=src)
    if staged is not tensor:
        tensor.copy_(staged)


def scatter_(out, chunks=None, src: int = 0) -> None:
    """Rank `src` sends chunks[r] to rank r, which writes it into `out` (same shape on every rank).

    One collective on the default group's communicator: point-to-point sends would make NCCL create and keep
    a communicator per pair of ranks."""
    import torch
    import torch.distributed as dist

    if not _grouped():
        out.copy_(chunks[0])
        return
    device = comm_device()
    staged = out if out.device == device else torch.empty(out.shape, dtype=out.dtype, device=device)
    scatter_list = [c.to(device=device, dtype=out.dtype) for c in chunks] if dist.get_rank() == src else None
    dist.scatter(staged, scatter_list, src=src)
    if staged is not out:
        out.copy_(staged)


def gather_objects(obj, group=None) -> list:
    """[obj of each rank of `group` (default: all), in rank order] on every rank of it (picklable objects); [obj]
    without a process group."""
    import torch.distributed as dist

    if not _grouped():
        return [obj]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def new_group(ranks: list[int]):
    """A process group of `ranks` (every rank of the job must create every group, in the same order)."""
    import torch.distributed as dist

    return dist.new_group(ranks)


def barrier() -> None:
    """Wait for every rank; a no-op in a single process without a process group. An all-reduce on the
    communication device rather than dist.barrier(), which guesses a device under NCCL; its result is copied
    back to the CPU so that the host, not only the GPU stream, waits for the others."""
    import torch

    all_reduce(torch.zeros(1))


# --------------------------------------------------------------------------- phases of rank 0 alone
PHASE_KEY = "dpo_ds/rank0"  # one phase at a time: the key is gone before any rank can start the next phase
PROGRESS_S = 60.0  # rank 0 logs that it is still busy this often during a phase of its own
BEAT_KEY = "dpo_ds/rank0_beat"  # a counter rank 0 increments every BEAT_S seconds for the whole run
BEAT_S = 5.0
# The waiting ranks of a phase stop when rank 0's heartbeat has not moved, or its store has not answered, for this
# long: rank 0 is frozen (SIGSTOP, swapping, a hung file system) or its node is gone. Far above any pause of a live
# process's heartbeat thread; LAUNCHER_RANK0_SILENCE_S overrides it (the beat then comes at least 5 times per bound).
RANK0_SILENCE_S = 300.0
_heartbeat_started = False


class Rank0Lost(LauncherError):
    """Rank 0 died or froze while the others waited for a phase of its own. Every waiting rank sees it alike, so
    one rank per node says it (as for bad input); the exit status is a launcher failure's (1), which
    dpo.sbatch's RESTART_ON_FAILURE may restart."""
    every_rank = False


def silence_bound_s() -> float:
    """RANK0_SILENCE_S, or LAUNCHER_RANK0_SILENCE_S when set."""
    value = os.environ.get("LAUNCHER_RANK0_SILENCE_S")
    try:
        bound = float(value) if value else RANK0_SILENCE_S
    except ValueError:
        raise LauncherError(f"LAUNCHER_RANK0_SILENCE_S={value!r} is not a number of seconds") from None
    if bound <= 0:
        raise LauncherError(f"LAUNCHER_RANK0_SILENCE_S={value!r} must be positive")
    return bound


def _store():
    import torch.distributed as dist

    if process_world_size() == 1:
        return None
    return dist.distributed_c10d._get_default_store()


def start_heartbeat() -> None:
    """Rank 0 (of more than one): from now until the process ends, increment BEAT_KEY in the rendezvous store
    every BEAT_S seconds (more often under a short LAUNCHER_RANK0_SILENCE_S), from a thread of its own, so the
    ranks waiting in on_rank0 can tell a busy rank 0 from a dead or frozen one."""
    global _heartbeat_started
    store = _store()
    if store is None or process_rank() != 0 or _heartbeat_started:
        return
    interval = min(BEAT_S, silence_bound_s() / 5)
    store.add(BEAT_KEY, 1)  # the first beat before any rank can start waiting for one

    def beat() -> None:
        while True:
            time.sleep(interval)
            try:
                store.add(BEAT_KEY, 1)
            except Exception:  # the store is gone: the job is ending
                return

    threading.Thread(target=beat, name="dpo-ds-rank0-heartbeat", daemon=True).start()
    _heartbeat_started = True


def on_rank0(what: str, work: Callable[[], T], failure: type[Exception] = RuntimeError) -> T:
    """Run `work()` on rank 0 alone while the other ranks wait for it, however long it takes while rank 0 lives,
    and return its result (JSON-serialisable) on every rank; if it raises on rank 0, the other ranks raise
    `failure` with rank 0's message. Every rank must call it, in the same order.

    For the phases only rank 0 does (preparing the data, universal-checkpoint conversion, writing an export,
    building the bench model, publishing a checkpoint): the waiting ranks poll the rendezvous store instead of
    sitting in a collective, so neither dist_timeout_s nor NCCL's watchdog can kill them, and rank 0 logs every
    PROGRESS_S seconds that it is still at it; two short barriers, once all have the outcome, end the phase.
    The wait watches rank 0 (start_heartbeat): when rank 0 dies (its store, which it hosts under srun and
    mpirun, refuses connections) or stops beating or answering for silence_bound_s(), the waiting ranks raise
    Rank0Lost, saying so."""
    store = _store()
    if store is None:
        return work()
    import torch.distributed as dist

    if dist.get_rank() == 0:
        started, done = time.monotonic(), threading.Event()

        def progress() -> None:
            while not done.wait(PROGRESS_S):
                logger.info("rank 0 still %s (%.0f s); the other ranks wait for it as long as it lives",
                            what, time.monotonic() - started)

        threading.Thread(target=progress, daemon=True).start()
        try:
            result = work()
        except Exception as err:  # the others raise `failure` with the message (and the type when it differs)
            _end_phase(store, {"error": str(err) if isinstance(err, failure) else f"{type(err).__name__}: {err}"})
            raise
        finally:
            done.set()
        _end_phase(store, {"result": result})
        return result
    outcome = _wait_for_rank0(store, what)
    barrier()  # every rank has read the outcome
    barrier()  # rank 0 has removed it
    if "error" in outcome:
        raise failure(f"rank 0 failed while {what}: {outcome['error']}")
    return outcome["result"]


def _wait_for_rank0(store, what: str) -> dict:
    """A waiting rank: poll the store for the phase's outcome (backing off to every 2 s: a short phase costs little
    latency, a long one few store requests) while watching rank 0's heartbeat; Rank0Lost when it is gone."""
    bound, waiting_since = silence_bound_s(), time.monotonic()
    beat, beat_seen_at, pause = None, waiting_since, 0.01
    while True:
        outcome, new_beat = _ask_store(store, bound, what, waiting_since)
        if outcome is not None:
            return outcome
        now = time.monotonic()
        if new_beat != beat:
            beat, beat_seen_at = new_beat, now
        elif now - beat_seen_at > bound:
            raise _lost(what, waiting_since, f"its heartbeat has not moved for {now - beat_seen_at:.0f} s")
        time.sleep(pause)
        pause = min(2 * pause, 2.0)


def _ask_store(store, bound: float, what: str, waiting_since: float) -> tuple[dict | None, int | None]:
    """(the phase's outcome or None, rank 0's heartbeat count), asked in a thread of its own: a store request to
    a frozen rank 0 hosting the store never returns (the socket stays open), so no answer within `bound` means
    rank 0 is lost. A store that refuses connections means rank 0 has died: checked with a plain connection
    first, since the store client's own failure comes with a C++ stack dump on stderr."""
    answer: dict = {}

    def ask() -> None:
        try:
            host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
            if host and port:  # where the process group's store is (exported by init_distributed)
                socket.create_connection((host, int(port)), timeout=bound).close()
            if store.check([PHASE_KEY]):
                answer["outcome"] = json.loads(store.get(PHASE_KEY))
            else:
                answer["beat"] = store.add(BEAT_KEY, 0)
        except Exception as err:
            answer["error"] = err

    asking = threading.Thread(target=ask, name="dpo-ds-wait-for-rank0", daemon=True)
    asking.start()
    asking.join(bound)
    if asking.is_alive():
        raise _lost(what, waiting_since, f"its store has not answered for {bound:.0f} s")
    if "error" in answer:
        err = answer["error"]
        raise _lost(what, waiting_since, f"its store at {os.environ.get('MASTER_ADDR')}:"
                    f"{os.environ.get('MASTER_PORT')} fails ({type(err).__name__}: {err})", died=True)
    return answer.get("outcome"), answer.get("beat")


def _lost(what: str, waiting_since: float, why: str, died: bool = False) -> Rank0Lost:
    likely = ("rank 0 has probably died (killed, out of memory, its node lost: see its last lines and the "
              "node's kernel log)" if died else
              "rank 0 is probably frozen (stopped, swapping, a hung file system) or its node is gone")
    return Rank0Lost(f"rank 0 was lost while {what}: {why} (after {time.monotonic() - waiting_since:.0f} s of "
                     f"waiting for it; the bound is {silence_bound_s():g} s, LAUNCHER_RANK0_SILENCE_S); {likely}. "
                     f"Rank {process_rank()} stops instead of waiting forever")


def _end_phase(store, outcome: dict) -> None:
    """Rank 0: publish the phase's outcome, wait until every rank has read it, remove it (so the next phase starts
    from a clean store: no phase counter that every rank must advance alike), and let the others go on. Rank 0
    hosts the store under srun/MPI: it must not exit before every rank has read an error."""
    store.set(PHASE_KEY, json.dumps(outcome))
    barrier()
    store.delete_key(PHASE_KEY)
    barrier()


SHARED_CHECK_FILE = ".dpo-ds-shared-check"


def check_shared_dirs(dirs: dict[str, str]) -> None:
    """Stop on every rank unless each directory of `dirs` (config field -> path) is the same directory on
    every rank: rank 0 creates it and writes a fresh token into it, every other rank reads the token back.
    Checkpoints, the token and reference caches and the final model are written by one rank and read by the
    others, so a node-local path would make them crash or hang later. Every rank must call it."""
    if process_world_size() == 1:
        return
    import torch.distributed as dist

    def write_tokens() -> dict[str, str]:
        tokens = {}
        for field, path in dirs.items():
            tokens[field] = uuid.uuid4().hex
            try:
                Path(path).mkdir(parents=True, exist_ok=True)
                (Path(path) / SHARED_CHECK_FILE).write_text(tokens[field])
            except OSError as err:
                raise LauncherError(f"{field} {path!r}: rank 0 cannot write there ({err})") from err
        return tokens

    tokens = on_rank0("writing the shared-storage check files", write_tokens, LauncherError)
    problems = {}
    for field, path in dirs.items():
        try:
            seen = (Path(path) / SHARED_CHECK_FILE).read_text()
        except OSError as err:
            problems[field] = f"cannot read it ({err.strerror or err})"
            continue
        if seen != tokens[field]:
            problems[field] = "reads an older check file there (another directory under the same path)"
    reports = gather_objects((socket.gethostname(), problems))
    if dist.get_rank() == 0:
        for path in dirs.values():
            (Path(path) / SHARED_CHECK_FILE).unlink(missing_ok=True)
    barrier()  # no rank goes on (or lists the directory) while the check file is still there
    failed = {field: [(rank, host, seen[field]) for rank, (host, seen) in enumerate(reports) if field in seen]
              for field in dirs}
    lines = [f"{field} {dirs[field]!r} is not the same directory on every rank: rank 0 "
             f"(host {reports[0][0]}) wrote a check file there and "
             + "; ".join(f"rank {rank} (host {host}) {why}" for rank, host, why in bad[:8])
             + (f"; and {len(bad) - 8} more rank(s)" if len(bad) > 8 else "")
             for field, bad in failed.items() if bad]
    if lines:
        raise LauncherError(". ".join(lines) + ". Every rank must see output_dir and cache_dir on one shared "
                            "file system: one rank writes checkpoints, caches and the final model that the "
                            "others read.")


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
        bound = bind_gpu(env, torch.cuda.device_count(), os.environ)
        if bound.local_rank != env.local_rank and "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
            # DeepSpeed asserts that Open MPI's local rank equals LOCAL_RANK, the device index it uses.
            os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(bound.local_rank)
        env = bound
        export(env)
        torch.cuda.set_device(env.local_rank)

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
    start_heartbeat()
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

    total = all_reduce(torch.tensor([env.rank + 1.0]))  # sum of 1..world_size proves every rank took part
    print(f"launcher: {env.describe()} host={socket.gethostname()} "
          f"allreduce={int(total.item())} expected={env.world_size * (env.world_size + 1) // 2}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
