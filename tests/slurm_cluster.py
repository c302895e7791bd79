"""A real, throw-away two-node Slurm cluster on 127.0.0.1 for tests.

    with slurm_cluster() as cluster:          # or the `slurm` fixture in test_slurm.py
        job = cluster.sbatch(["-N", "2", "job.sh"], env=cluster.env())
        cluster.wait(job)

What it starts (all in a fresh /tmp/dpo-slurm-XXXX directory, all as root):
  - munged with its own random key and socket (so it never touches /etc/munge or a
    munged the machine may run);
  - one slurmctld and two slurmd (`slurmd -N n1`, `slurmd -N n2`: Slurm's
    "multiple slurmd" mode), every daemon on its own free 127.0.0.1 port;
  - slurm.conf: nodes n1,n2 with NodeAddr=127.0.0.1 and as many CPUs as this machine,
    one partition with both, no cgroups (proctrack/linuxproc, task/none: signals reach
    every descendant of a task, as proctrack/cgroup does on real clusters),
    ReturnToService=2 and short timeouts.  FirstJobId is random: the launcher derives a
    job's rendezvous port from its id (20000 + id % 10000), and two test sessions
    running at once would otherwise both have a job 1 on port 20001.
It waits until `sinfo` shows both nodes idle.  Clients find it through SLURM_CONF in
`cluster.env()`.

Teardown (also when a test or the start-up fails): cancel every job, stop the daemons,
then kill any process still carrying this cluster's SLURM_CONF in its environment
(slurmstepd, job steps, tasks), and remove the directory.  Leftovers of a run that
was killed outright (its owner pid is gone) are reaped the same way by the next run.

Only processes started by this module are ever signalled: they are recognised by the
cluster's own, unique SLURM_CONF path.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO / ".ci" / "install_slurm.sh"
ROOT_PREFIX = "dpo-slurm-"
# Short and world-searchable: munged wants every directory above its socket searchable
# by all, and a unix socket path must stay under 108 bytes (TMPDIR may be neither).
TMP = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
NODES = ("n1", "n2")
DAEMONS = ("munged", "slurmctld", "slurmd")

# Launcher/scheduler variables a test process may have inherited (say, pytest itself
# running inside a Slurm job) that must not leak into the jobs of the test cluster.
_STRIP_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMI_", "PMIX_")
_STRIP_NAMES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "DPO_DS_DIST_SOURCE"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be used here at all (not root, packages missing): tests skip."""


class SlurmStartError(RuntimeError):
    """Slurm is installed but the cluster did not come up: tests fail, with the logs."""


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is chosen, so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ensure_installed() -> None:
    """Install slurm-wlm + munge via .ci/install_slurm.sh if needed; SlurmUnavailable if impossible."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the Slurm tests start slurmctld/slurmd/munged and need root")
    if all(shutil.which(d) for d in DAEMONS + ("sbatch",)):
        return
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=1200)
    missing = [d for d in DAEMONS + ("sbatch",) if not shutil.which(d)]
    if missing:
        raise SlurmUnavailable(f"Slurm install failed ({', '.join(missing)} missing after {INSTALL_SCRIPT}): "
                               f"{(proc.stdout + proc.stderr)[-2000:]}")


# ------------------------------------------------------------------ process sweeping
def _environ_of(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _pids_with_conf(conf: str) -> list[int]:
    """Processes whose environment has SLURM_CONF=<conf>: this cluster's daemons, steps and tasks."""
    needle = f"SLURM_CONF={conf}\0".encode()
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me and needle in _environ_of(int(entry.name)) + b"\0":
            pids.append(int(entry.name))
    return pids


def _kill_all(pids: Sequence[int], grace_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child: reap it
                return False
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started us dies (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def reap_stale_clusters() -> None:
    """Kill what a previous, killed test run left behind (its owner pid no longer exists)."""
    for root in Path(TMP).glob(ROOT_PREFIX + "*"):
        owner = root / "owner.pid"
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            pid = -1
        if pid > 0 and _alive(pid):
            continue  # another live test session's cluster
        _kill_all(_pids_with_conf(str(root / "slurm.conf")))
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ the cluster
class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.log_dir = root / "log"
        self.procs: list[subprocess.Popen] = []
        self.ctld_port, *self.node_ports = _free_ports(1 + len(NODES))

    # -------------------------------------------------------------- config
    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "run"):
            (r / d).mkdir()
        cpus = os.cpu_count() or 1
        host = socket.gethostname()
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} State=UNKNOWN"
                          for n, p in zip(NODES, self.node_ports))
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py: a two-node cluster on 127.0.0.1 (multiple-slurmd mode).
ClusterName=dpotest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers rarely allow them); linuxproc tracks every descendant of a
# task, so step signals also reach processes in new sessions (torchrun's workers).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Both slurmd run on one machine: trust the CPU count below, not the hardware probe.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
InactiveLimit=0
# Seconds between SIGTERM and SIGKILL when a job is killed or requeued: room to checkpoint.
KillWait=60
UnkillableStepTimeout=120
# Keep finished jobs visible to `scontrol show job` for the test's assertions.
MinJobAge=3600
FirstJobId={random.randrange(1000, 9000)}
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A clean environment for Slurm clients and jobs of this cluster."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_STRIP_PREFIXES) and k not in _STRIP_NAMES}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    # -------------------------------------------------------------- daemons
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.log_dir / f"{name}.stdout", "wb")
        # Own session: a Ctrl-C in the terminal goes to pytest, which tears down in order.
        # Parent-death signal: if pytest is killed outright, the daemons go with it.
        self.procs.append(subprocess.Popen(argv, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True,
                                           preexec_fn=_die_with_parent))
        out.close()

    def start(self, timeout_s: float = 60) -> None:
        r = self.root
        r.chmod(0o755)  # munged insists that its socket's directories be searchable by all
        (r / "owner.pid").write_text(str(os.getpid()))
        self.write_config()
        (r / "munge").mkdir(mode=0o755)
        key_dir = r / "munge-key"
        key_dir.mkdir(mode=0o700)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn("munged", ["munged", "--foreground", f"--socket={r}/munge/munge.socket",
                               f"--key-file={key}", f"--pid-file={r}/munge/munged.pid",
                               f"--log-file={self.log_dir}/munged.log", f"--seed-file={key_dir}/munged.seed"])
        self._wait_for(lambda: (r / "munge" / "munge.socket").exists(), 20, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_for(self._nodes_idle, timeout_s, "both nodes idle in sinfo")

    def _nodes_idle(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise SlurmStartError(f"{p.args[0]} exited with {p.returncode}\n{self.logs()}")
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
        states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
        return all(states.get(n) == "idle" for n in NODES)

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise SlurmStartError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 30) -> str:
        parts = []
        for f in sorted(self.log_dir.glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"==> {f.name} <==\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel jobs, stop daemons, kill whatever still carries our SLURM_CONF."""
        if any(p.poll() is None for p in self.procs) and shutil.which("scancel"):
            with contextlib.suppress(Exception):
                self.run(["scancel", "--full", "--user", "root"], check=False, timeout=20)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False, timeout=20).stdout.strip():
                    time.sleep(0.5)
        # slurmd before slurmctld before munged, so nothing logs auth errors on the way down.
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        _kill_all(_pids_with_conf(str(self.conf)))

    # -------------------------------------------------------------- clients
    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 60,
            env: Mapping[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), env=dict(env) if env is not None else self.env(),
                              capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, args: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout_s: float = 600,
             states: Sequence[str] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                      "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"),
             release_requeued: bool = True) -> dict[str, str]:
        """Wait for one of `states`, held for 3 s: while a job is being requeued Slurm can briefly show
        the run's end state (FAILED) before the job turns PENDING again.  With release_requeued a requeued
        job is made eligible 2 s after it is seen pending instead of after Slurm's requeue delay (BeginTime
        ~2 min). Not sooner: slurmd refuses a launch whose credential is from the same second as the previous
        run's revocation ("Job credential revoked"), and the job then ends FAILED."""
        deadline = time.monotonic() + timeout_s
        seen: tuple[str, float] | None = None
        pending_since: dict[str, float] = {}  # restart count -> when it was first seen held by BeginTime
        while True:
            info = self.job(job_id)
            state = info.get("JobState")
            if state in states:
                if seen is None or seen[0] != state:
                    seen = (state, time.monotonic())
                elif time.monotonic() - seen[1] >= 3:
                    return info
            else:
                seen = None
            if release_requeued and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                since = pending_since.setdefault(info.get("Restarts", ""), time.monotonic())
                if time.monotonic() - since >= 2:  # StartTime=now also makes the scheduler run at once
                    self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout_s:.0f}s: {info}\n"
                                   f"{self.logs()}")
            time.sleep(1)


@contextlib.contextmanager
def slurm_cluster(timeout_s: float = 60) -> Iterator[SlurmCluster]:
    """Start the cluster (SlurmUnavailable / SlurmStartError on failure), always tear it down."""
    ensure_installed()
    reap_stale_clusters()
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=TMP)))
    try:
        cluster.start(timeout_s)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
