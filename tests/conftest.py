"""Shared fixtures; every test process runs DeepSpeed on the CPU and talks only to 127.0.0.1.

Markers (registered in pytest.ini): a test or test file marks itself `distributed` (it starts processes: ranks
under torchrun, the CLI in a subprocess, tokenizer workers, external tools), `mpi` (mpirun) or `slurm` (a real
Slurm cluster); every other test is `unit` and must stay in this process: a unit test, or a fixture it sets up,
that starts a process fails (`make test-fast` runs the unit tests alone).
"""
from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["MASTER_ADDR"] = "127.0.0.1"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))

PROCESS_MARKERS = ("distributed", "mpi", "slurm")


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test starts from the same environment: code that runs in-process may export variables by design (the
    launcher exports RANK, LOCAL_RANK, WORLD_SIZE), and a later test's subprocess would inherit them (one started
    `dpo-ds train --nproc_per_node` inside what looked like a rank of a launcher)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def pytest_collection_modifyitems(items):
    for item in items:
        if not any(item.get_closest_marker(name) for name in PROCESS_MARKERS):
            item.add_marker(pytest.mark.unit)


@contextlib.contextmanager
def _no_new_processes(started: list[str]):
    """Refuse subprocess, fork and multiprocessing starts; record each attempt in `started`."""
    def refuse(what):
        def start(*args, **kwargs):
            started.append(what)
            raise RuntimeError(f"a unit test started a process ({what}): mark the test distributed")
        return start

    targets = [(subprocess.Popen, "_execute_child", "subprocess"), (os, "fork", "os.fork"),
               (multiprocessing.process.BaseProcess, "start", "multiprocessing")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    for owner, name, what in targets:
        setattr(owner, name, refuse(what))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _guarded(item):
    if not item.get_closest_marker("unit"):
        return (yield)
    started: list[str] = []
    with _no_new_processes(started):
        result = yield
    if started:
        pytest.fail(f"{item.nodeid} is marked unit but started a process ({', '.join(started)}): mark it "
                    f"distributed", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):  # fixtures too: a module-scoped fixture that launches ranks is not unit
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded(item))


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    from dpo_ds.demo_data import build_demo_assets

    return build_demo_assets(str(tmp_path_factory.mktemp("demo_assets")), n_train=96, n_heldout=16)
