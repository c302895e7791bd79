"""dpo_ds.compiled_ops: which preset compiles a DeepSpeed op, and the clear error before step 1 when this
machine cannot build it (toolchains are fakes: no compiler runs here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_ds.compiled_ops import Toolchain, build_problems, check_compiled_ops, compiled_optimizer_op
from dpo_ds.config import ConfigError

PRESETS = Path(__file__).resolve().parent.parent / "ds_configs"
COMPLETE = Toolchain(torch_cuda="12.8", nvcc="/usr/local/cuda/bin/nvcc", nvcc_cuda="12.8", cxx="/usr/bin/c++",
                     ninja=True, python_headers=True)


def preset(name: str) -> dict:
    return json.loads((PRESETS / name).read_text())


@pytest.mark.parametrize("name, op", [("zero3.json", None), ("zero3_cpu.json", None),
                                      ("reference_zero3.json", None), ("zero3_fused_adam.json", "fused_adam"),
                                      ("zero3_offload_optimizer.json", "cpu_adam"),
                                      ("zero3_offload_all.json", "cpu_adam")])
def test_which_presets_compile_an_op(name, op):
    assert compiled_optimizer_op(preset(name)) == op


def test_default_gpu_preset_is_torch_fused_adamw():
    params = preset("zero3.json")["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True


@pytest.mark.parametrize("change, expected", [
    (dict(nvcc=None, nvcc_cuda=None), "no nvcc (CUDA_HOME/bin/nvcc; torch is built for CUDA 12.8)"),
    (dict(nvcc_cuda="12.4"), "nvcc is CUDA 12.4 but torch is built for CUDA 12.8"),
    (dict(torch_cuda="13.0", nvcc_cuda="13.1"), "nvcc is CUDA 13.1 but torch is built for CUDA 13.0"),
    (dict(python_headers=False), "no Python headers (Python.h"),
    (dict(cxx=None), "no C++ compiler"),
    (dict(ninja=False), "no ninja on PATH"),
])
def test_fused_adam_problems_name_what_is_missing(change, expected):
    problems = build_problems("fused_adam", Toolchain(**{**COMPLETE.__dict__, **change}), on_gpu=True)
    assert len(problems) == 1 and problems[0].startswith(expected)


def test_a_complete_toolchain_or_a_prebuilt_op_has_no_problem():
    assert build_problems("fused_adam", COMPLETE, on_gpu=True) == []
    bare = Toolchain(torch_cuda="12.8", nvcc=None, nvcc_cuda=None, cxx=None, ninja=False, python_headers=False,
                     prebuilt={"fused_adam": True})
    assert build_problems("fused_adam", bare, on_gpu=True) == []
    assert len(build_problems("cpu_adam", bare, on_gpu=True)) == 3


def test_deepspeeds_accepted_minor_mismatch_and_cpu_adam_needs_no_nvcc():
    tolerated = Toolchain(**{**COMPLETE.__dict__, "nvcc_cuda": "11.8", "torch_cuda": "11.7",
                             "minor_mismatch_ok": {11: ["11.7", "11.8"]}})
    assert build_problems("fused_adam", tolerated, on_gpu=True) == []
    no_nvcc = Toolchain(**{**COMPLETE.__dict__, "nvcc": None, "nvcc_cuda": None})
    assert build_problems("cpu_adam", no_nvcc, on_gpu=True) == []


def test_check_raises_a_config_error_naming_the_preset_and_the_fix():
    no_nvcc = Toolchain(**{**COMPLETE.__dict__, "nvcc": None, "nvcc_cuda": None})
    with pytest.raises(ConfigError) as err:
        check_compiled_ops(preset("zero3_fused_adam.json"), "ds_configs/zero3_fused_adam.json", True, no_nvcc)
    message = str(err.value)
    assert message.startswith("ds_configs/zero3_fused_adam.json: the optimizer is DeepSpeed's FusedAdam")
    assert "no nvcc" in message and '"torch_adam": true' in message and err.value.field_name == "deepspeed_config"
    nothing = Toolchain(torch_cuda=None, nvcc=None, nvcc_cuda=None, cxx=None, ninja=False, python_headers=False)
    check_compiled_ops(preset("zero3.json"), "ds_configs/zero3.json", True, nothing)  # compiles nothing
