"""`dpo-ds env`: one table (or JSON) of versions against setup.cfg's ranges, accelerator, attention kernels,
compiled ops per preset, and the process group / shared storage under a launcher."""
from __future__ import annotations

import json

import pytest

from dpo_ds import cli, compiled_ops, env_report, versions
from helpers import launch


@pytest.fixture
def no_nvcc(monkeypatch):
    """This machine's toolchain without running nvcc (a unit test starts no process): a C++ compiler, ninja and
    the Python headers, no CUDA."""
    tools = compiled_ops.Toolchain(torch_cuda=None, nvcc=None, nvcc_cuda=None, cxx="/usr/bin/c++", ninja=True,
                                   python_headers=True)
    monkeypatch.setattr(compiled_ops, "find_toolchain", lambda needs_nvcc: tools)


def rows_by_check(text: str) -> dict[str, dict]:
    return {r["check"]: r for r in json.loads(text)}


def test_env_reports_every_check_and_the_tested_ranges(capsys, no_nvcc):
    assert cli.main(["env", "--json"]) == 0
    rows = rows_by_check(capsys.readouterr().out)
    ranges = versions.tested_ranges(packages=env_report.REPORTED)
    for name in env_report.REPORTED:  # each version with the range setup.cfg declares for it
        assert rows[name]["value"] == versions.installed_version(name)
        assert rows[name]["detail"] == f"tested: {versions.pip_spec(ranges[name])}" and rows[name]["status"] == "ok"
    assert rows["deepspeed accelerator"]["value"] == "cpu" and rows["attention: sdpa"]["value"] == "yes"
    assert rows["preset zero3.json"]["value"] == "compiles nothing"
    assert rows["preset zero3_fused_adam.json"]["value"] == "compiles fused_adam"
    assert rows["preset zero3_fused_adam.json"]["detail"] == "this machine can build it"  # on the CPU: no nvcc
    assert rows["process group (gloo)"]["status"] == rows["shared storage"]["status"] == "skip"  # one process


def test_env_table_and_a_version_outside_its_range_fails(capsys, monkeypatch, no_nvcc):
    real = versions.installed_version
    monkeypatch.setattr(env_report, "installed_version", lambda name: "5.16.0" if name == "transformers" else real(name))
    assert cli.main(["env"]) == 1  # the start-up version check does not stop `env`: it reports
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["check", "value", "status", "detail"]
    transformers_line = next(line for line in lines if line.startswith("transformers "))
    assert transformers_line.split()[:3] == ["transformers", "5.16.0", "fail"]
    assert transformers_line.endswith("tested: transformers>=5.17,<6")
    assert len(lines) == 1 + len(env_report.collect(".", 10))


@pytest.mark.distributed
def test_env_under_torchrun_checks_the_collective_and_shared_storage(tmp_path):
    proc = launch(["-m", "dpo_ds", "env", "--json", "--dir", str(tmp_path / "shared")], timeout=300)
    rows = rows_by_check(proc.stdout)  # rank 0 alone prints
    assert rows["process group (gloo)"]["value"] == "2 ranks" and rows["process group (gloo)"]["status"] == "ok"
    assert rows["shared storage"]["status"] == "ok" and rows["shared storage"]["detail"].endswith("all 2 ranks")
