"""launcher.env.resolve for every launcher, from synthetic environments, plus the
rendezvous timeout of launcher.dist.init_distributed (one real subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import launcher.__main__ as launcher_main
from launcher.env import strip_local_rank
from launcher.local import rank_environ
from launcher.env import (SOURCE_VAR, DistEnv, LauncherError, bind_gpu, detect, expand_hostlist, resolve,
                          slurm_port)

REPO = Path(__file__).resolve().parents[1]


def no_scontrol(nodelist):
    raise AssertionError(f"scontrol must not be called (nodelist {nodelist!r})")


def no_mpi():
    raise AssertionError("mpi4py must not be touched")


def fake_scontrol(calls):
    def expand(nodelist):
        calls.append(nodelist)
        return expand_hostlist(nodelist)
    return expand


class FakeMpi:
    """One rank's view of an MPI world; bcast returns what rank 0 of `peers` sent."""

    def __init__(self, rank, size, local_rank, local_size, root_value=None):
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size
        self.root_value, self.sent = root_value, None

    def bcast(self, obj, root=0):
        assert root == 0
        if self.rank == 0:
            self.sent = obj
            return obj
        return self.root_value


TORCHRUN = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}

# What srun exports to task 5 of `srun -N 2 --ntasks-per-node=4` in job 123456.
SLURM = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODEID": "1",
         "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
         "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456",
         "SLURM_STEP_ID": "0"}


# ----------------------------------------------------------------------------- single / torchrun
def test_no_variables_is_a_single_process():
    env = resolve({}, scontrol=no_scontrol, mpi=no_mpi)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (0, 0, 1, 1)
    assert env.master_addr == "127.0.0.1" and 1024 <= env.master_port < 65536
    assert env.source == "single"


def test_single_honours_master_port():
    assert resolve({"MASTER_PORT": "31111"}, no_scontrol, no_mpi).master_port == 31111


def test_torchrun():
    env = resolve(TORCHRUN, scontrol=no_scontrol, mpi=no_mpi)
    assert env == DistEnv(5, 1, 8, 4, "node0", 29500, "torchrun")


def test_deepspeed_launcher_local_size():
    environ = dict(TORCHRUN)
    del environ["LOCAL_WORLD_SIZE"]
    environ["LOCAL_SIZE"] = "4"  # the deepspeed launcher's name for it
    assert resolve(environ, no_scontrol, no_mpi).local_world_size == 4


@pytest.mark.parametrize("drop", ["WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK"])
def test_torchrun_partial_names_missing_variable(drop):
    environ = {k: v for k, v in TORCHRUN.items() if k != drop}
    with pytest.raises(LauncherError) as e:
        resolve(environ, no_scontrol, no_mpi)
    msg = str(e.value)
    assert f"but {drop} is missing" in msg and "torchrun" in msg


def test_rank_alone_lists_every_missing_variable():
    with pytest.raises(LauncherError) as e:
        resolve({"RANK": "0"}, no_scontrol, no_mpi)
    msg = str(e.value)
    assert "looks like torchrun or the deepspeed launcher" in msg
    assert "found RANK" in msg
    assert "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are missing" in msg


def test_inconsistent_values_are_rejected():
    with pytest.raises(LauncherError, match=r"rank 8 outside \[0, 8\)"):
        resolve({**TORCHRUN, "RANK": "8"}, no_scontrol, no_mpi)
    with pytest.raises(LauncherError, match="WORLD_SIZE='two' is not an integer"):
        resolve({**TORCHRUN, "WORLD_SIZE": "two"}, no_scontrol, no_mpi)


# ----------------------------------------------------------------------------- slurm
def test_slurm_one_task_per_gpu():
    calls = []
    env = resolve(SLURM, scontrol=fake_scontrol(calls), mpi=no_mpi)
    assert env == DistEnv(5, 1, 8, 4, "gpu07", slurm_port(123456), "slurm")
    assert calls == ["gpu[07-08]"]


def test_slurm_port_is_deterministic_and_unprivileged():
    assert slurm_port(123456) == 20000 + 123456 % 10000 == 23456
    ports = {slurm_port(j) for j in range(0, 100000, 7)}
    assert min(ports) >= 20000 and max(ports) < 30000  # below the Linux ephemeral range


def test_slurm_master_overrides_skip_scontrol():
    environ = {**SLURM, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    del environ["SLURM_JOB_NODELIST"], environ["SLURM_STEP_NODELIST"], environ["SLURM_JOB_ID"]
    env = resolve(environ, scontrol=no_scontrol, mpi=no_mpi)
    assert (env.master_addr, env.master_port, env.source) == ("127.0.0.1", 29999, "slurm")


def test_slurm_uneven_tasks_per_node_from_step():
    # srun -n 5 over 2 nodes: 3 tasks on the first, 2 on the second; we are on node 1.
    environ = {"SLURM_PROCID": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS": "5", "SLURM_NODEID": "1",
               "SLURM_STEP_TASKS_PER_NODE": "3,2", "SLURM_TASKS_PER_NODE": "3,2",
               "SLURM_JOB_NODELIST": "a1,a2", "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "2"}
    env = resolve(environ, scontrol=fake_scontrol([]), mpi=no_mpi)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (4, 1, 5, 2)
    assert (env.master_addr, env.master_port) == ("a1", 20007)


def test_slurm_partial_names_missing_variable():
    environ = {k: v for k, v in SLURM.items() if k not in ("SLURM_NTASKS", "SLURM_JOB_ID")}
    with pytest.raises(LauncherError) as e:
        resolve(environ, no_scontrol, no_mpi)
    msg = str(e.value)
    assert "looks like a Slurm task started by srun" in msg
    assert "SLURM_NTASKS, SLURM_JOB_ID or SLURM_JOBID are missing" in msg


def test_batch_shell_is_a_single_process():
    # `python -m launcher` run directly in an sbatch script (no srun): no step id.
    environ = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4",
               "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "0"}
    env = resolve(environ, scontrol=no_scontrol, mpi=no_mpi)
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


@pytest.mark.parametrize("marker", [{"TORCHELASTIC_RUN_ID": "123456"}, {"LOCAL_SIZE": "4"}])
def test_torchrun_inside_slurm_wins(marker):
    # One srun task per node runs torchrun (or the deepspeed launcher): SLURM_* describe the agent, not the worker.
    environ = {**SLURM, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", **TORCHRUN, **marker}
    assert resolve(environ, no_scontrol, no_mpi) == DistEnv(5, 1, 8, 4, "node0", 29500, "torchrun")


def test_rank_inherited_from_the_submitting_shell_does_not_override_slurm():
    # sbatch passes the submitting shell's environment on, e.g. a RANK/WORLD_SIZE left by an earlier torchrun.
    environ = {**SLURM, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    assert resolve(environ, fake_scontrol([]), no_mpi) == DistEnv(5, 1, 8, 4, "gpu07", slurm_port(123456), "slurm")


@pytest.mark.parametrize("visible_devices, visible, local_rank", [("3", 1, 0), ("0,1,2,3", 4, 1), (None, 4, 1)])
def test_bind_gpu(visible_devices, visible, local_rank):
    # Slurm task 5 is the second task of its node (SLURM_LOCALID=1). With --gpus-per-task=1 / --gpu-bind it sees
    # one GPU (CUDA_VISIBLE_DEVICES=3), which is device 0 in the process: DeepSpeed must get LOCAL_RANK=0.
    environ = {**SLURM} if visible_devices is None else {**SLURM, "CUDA_VISIBLE_DEVICES": visible_devices}
    env = resolve(environ, fake_scontrol([]), no_mpi)
    bound = bind_gpu(env, visible, environ)
    assert bound.local_rank == local_rank and bound.as_environ()["LOCAL_RANK"] == str(local_rank)
    assert (bound.rank, bound.world_size, bound.local_world_size) == (5, 8, 4)


def test_bind_gpu_refuses_fewer_gpus_than_local_ranks():
    env = resolve({**SLURM, "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1"}, fake_scontrol([]), no_mpi)
    with pytest.raises(LauncherError, match=r"local rank 3 but only 2 GPU\(s\) visible \(CUDA_VISIBLE_DEVICES='0,1'\)"):
        bind_gpu(env, 2, {"CUDA_VISIBLE_DEVICES": "0,1"})
    with pytest.raises(LauncherError, match="no GPU visible"):
        bind_gpu(env, 0, {"CUDA_VISIBLE_DEVICES": ""})


def test_reresolve_keeps_original_source():
    # python -m launcher exports RANK & co; the trainer's init_distributed resolves again.
    first = resolve(SLURM, scontrol=fake_scontrol([]), mpi=no_mpi)
    again = resolve({**SLURM, **first.as_environ()}, no_scontrol, no_mpi)
    assert again == first and first.as_environ()[SOURCE_VAR] == "slurm"


# ----------------------------------------------------------------------------- mpi
@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"])
def test_mpi_rank0_picks_and_broadcasts(var):
    world = FakeMpi(rank=0, size=4, local_rank=0, local_size=2)
    env = resolve({var: "0", "MASTER_ADDR": "127.0.0.1"}, scontrol=no_scontrol, mpi=lambda: world)
    assert env.source == "mpi" and (env.rank, env.world_size, env.local_world_size) == (0, 4, 2)
    assert env.master_addr == "127.0.0.1" and world.sent == ("127.0.0.1", env.master_port)


def test_mpi_other_rank_uses_rank0_values_not_its_own():
    world = FakeMpi(rank=3, size=4, local_rank=1, local_size=2, root_value=("10.0.0.1", 24000))
    env = resolve({"OMPI_COMM_WORLD_RANK": "3", "MASTER_ADDR": "elsewhere", "MASTER_PORT": "1"},
                  scontrol=no_scontrol, mpi=lambda: world)
    assert env == DistEnv(3, 1, 4, 2, "10.0.0.1", 24000, "mpi")


def test_mpi_master_port_from_env():
    world = FakeMpi(rank=0, size=2, local_rank=0, local_size=2)
    env = resolve({"PMI_RANK": "0", "MASTER_PORT": "25000"}, no_scontrol, lambda: world)
    assert env.master_port == 25000


def test_mpirun_inside_slurm_allocation_is_mpi():
    # Open MPI starts its daemons with srun: SLURM_PROCID is the daemon's, not the rank's.
    environ = {**SLURM, "OMPI_COMM_WORLD_RANK": "3"}
    assert detect(environ) == "mpi"


def test_srun_with_pmix_is_slurm():
    # srun --mpi=pmix sets PMIX_RANK too; Slurm's variables suffice, no MPI_Init needed.
    assert detect({**SLURM, "PMIX_RANK": "5"}) == "slurm"
    assert detect({**SLURM, "PMI_RANK": "5", "PMI_SIZE": "8"}) == "slurm"
    assert detect({**SLURM, "PMI_RANK": "5", "PMI_SIZE": "32"}) == "mpi"  # Hydra proxies via srun


# ----------------------------------------------------------------------------- helpers
def test_expand_hostlist():
    assert expand_hostlist("gpu[07-09,11],cpu1") == ["gpu07", "gpu08", "gpu09", "gpu11", "cpu1"]
    assert expand_hostlist("n1") == ["n1"]


@pytest.mark.parametrize("user_level", [None, "INFO"])
def test_ranks_get_torch_cpp_log_at_error_unless_set(monkeypatch, user_level):
    """What `python -m launcher` (srun, mpirun, torchrun) and `dpo-ds train --nproc_per_node` give their ranks."""
    environ = {"PATH": os.environ["PATH"]} | ({} if user_level is None else {"TORCH_CPP_LOG_LEVEL": user_level})
    expected = user_level or "ERROR"
    assert rank_environ(environ, 1, 2, 29500)["TORCH_CPP_LOG_LEVEL"] == expected
    monkeypatch.setattr(os, "environ", dict(environ))
    seen = {}
    monkeypatch.setattr(launcher_main.runpy, "run_module", lambda *args, **kwargs: seen.update(os.environ))
    assert launcher_main.main(["train"]) == 0
    assert seen["TORCH_CPP_LOG_LEVEL"] == expected and seen["RANK"] == "0"


def test_local_ranks_share_the_cores(monkeypatch):
    """`dpo-ds train --nproc_per_node N`: each rank gets cores / N threads (at least 1) unless OMP_NUM_THREADS is
    set; one thread a core per rank would oversubscribe the machine N times."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [rank_environ({}, 0, n, 29500)["OMP_NUM_THREADS"] for n in (1, 2, 3, 16, 32)] == ["16", "8", "5", "1", "1"]
    assert rank_environ({"OMP_NUM_THREADS": "4"}, 1, 2, 29500)["OMP_NUM_THREADS"] == "4"


def test_strip_local_rank():
    assert strip_local_rank(["train", "--local_rank=3", "--x", "1"]) == (["train", "--x", "1"], "3")
    assert strip_local_rank(["train", "--local-rank", "2"]) == (["train"], "2")
    assert strip_local_rank(["train"]) == (["train"], None)


@pytest.mark.distributed
def test_main_reports_partial_environment(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(k, None)
    environ["RANK"] = "1"
    proc = subprocess.run([sys.executable, "-m", "launcher", "train", "--help"], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are missing" in proc.stderr


# ----------------------------------------------------------------------------- rendezvous timeout
@pytest.mark.distributed
def test_rendezvous_times_out_with_a_clear_message():
    """Rank 0 of a world of 2 started alone must give up, not wait forever."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    from launcher.env import free_port
    environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    code = "from launcher.dist import init_distributed; init_distributed(timeout_s=5)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "LauncherError: rendezvous failed: rank 0 of 2" in proc.stderr
    assert "for the other 1 rank(s) to connect" in proc.stderr
