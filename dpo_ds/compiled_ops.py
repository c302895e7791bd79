"""Which compiled DeepSpeed op a DeepSpeed config makes DeepSpeed build at its first optimizer step, and whether
this machine can build it: checked when the config is resolved, before any model is loaded, so a missing
toolchain is one clear error instead of a compiler traceback at step 1.

The presets' default optimizer is torch's fused AdamW through DeepSpeed (`"torch_adam": true`), which compiles
nothing; DeepSpeed's FusedAdam (GPU) and DeepSpeedCPUAdam (optimizer offloaded to CPU) are JIT-compiled C++/CUDA
extensions unless DeepSpeed was installed with them prebuilt (DS_BUILD_FUSED_ADAM=1 / DS_BUILD_CPU_ADAM=1).
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_ds.config import ConfigError

ADAM_TYPES = ("adam", "adamw")


@dataclass(frozen=True)
class Toolchain:
    """What building an op needs, as found on this machine (`find_toolchain`; tests pass their own)."""
    torch_cuda: str | None                # torch.version.cuda: None for a CPU build of torch
    nvcc: str | None                      # CUDA_HOME/bin/nvcc when it runs
    nvcc_cuda: str | None                 # its release, "12.8"
    cxx: str | None                       # the C++ compiler torch's extension builder calls
    ninja: bool                           # torch.utils.cpp_extension builds with ninja only
    python_headers: bool                  # Python.h (the python3-dev package)
    prebuilt: dict[str, bool] = field(default_factory=dict)  # deepspeed's installed_ops
    minor_mismatch_ok: dict[int, list[str]] = field(default_factory=dict)  # CUDA releases DeepSpeed accepts together


def compiled_optimizer_op(ds_config: dict[str, Any]) -> str | None:
    """DeepSpeed's op name ("fused_adam", "cpu_adam") that this config's optimizer compiles, or None."""
    optimizer = ds_config.get("optimizer") or {}
    if str(optimizer.get("type", "")).lower() not in ADAM_TYPES or (optimizer.get("params") or {}).get("torch_adam"):
        return None
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    return "cpu_adam" if offload in ("cpu", "nvme") else "fused_adam"


def _nvcc_release(nvcc: str) -> str | None:
    if not Path(nvcc).is_file():  # torch guesses CUDA_HOME (/usr/local) where only the runtime may be
        return None
    try:
        out = subprocess.run([nvcc, "-V"], capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if "release" not in out:
        return None
    return ".".join(out[out.index("release") + 1].rstrip(",").split(".")[:2])


def find_toolchain(needs_nvcc: bool) -> Toolchain:
    """This machine's tools; nvcc is looked for (and run, for its version) only when `needs_nvcc`: a CUDA op
    on a GPU."""
    import torch
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME if needs_nvcc else None
    nvcc = str(Path(home) / "bin" / "nvcc") if home else None
    release = _nvcc_release(nvcc) if nvcc else None
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        installed_ops = {}
    try:
        from deepspeed.ops.op_builder.builder import cuda_minor_mismatch_ok
    except ImportError:
        cuda_minor_mismatch_ok = {}
    return Toolchain(torch_cuda=torch.version.cuda, nvcc=nvcc if release else None, nvcc_cuda=release,
                     cxx=shutil.which(os.environ.get("CXX", "c++")), ninja=shutil.which("ninja") is not None,
                     python_headers=(Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
                     prebuilt=dict(installed_ops), minor_mismatch_ok=dict(cuda_minor_mismatch_ok))


def build_problems(op: str, tools: Toolchain, on_gpu: bool) -> list[str]:
    """Why `op` cannot be built here (empty: it can, or DeepSpeed was installed with it prebuilt)."""
    if tools.prebuilt.get(op):
        return []
    problems = []
    if not tools.cxx:
        problems.append("no C++ compiler (c++ or $CXX) on PATH")
    if not tools.ninja:
        problems.append("no ninja on PATH (pip install ninja)")
    if not tools.python_headers:
        problems.append("no Python headers (Python.h: the python3-dev package)")
    if op == "fused_adam" and on_gpu and tools.torch_cuda:
        torch_cuda = ".".join(tools.torch_cuda.split(".")[:2])
        if not tools.nvcc:
            problems.append(f"no nvcc (CUDA_HOME/bin/nvcc; torch is built for CUDA {torch_cuda})")
        elif tools.nvcc_cuda != torch_cuda and not _tolerated(tools, torch_cuda) \
                and os.environ.get("DS_SKIP_CUDA_CHECK") != "1":
            problems.append(f"nvcc is CUDA {tools.nvcc_cuda} but torch is built for CUDA {torch_cuda}; "
                            f"DeepSpeed builds only with a matching toolkit")
    return problems


def _tolerated(tools: Toolchain, torch_cuda: str) -> bool:
    major = int(torch_cuda.split(".")[0])
    accepted = tools.minor_mismatch_ok.get(major, [])
    return tools.nvcc_cuda in accepted and torch_cuda in accepted


def check_compiled_ops(ds_config: dict[str, Any], source: str, on_gpu: bool, tools: Toolchain | None = None) -> None:
    """ConfigError naming the preset, the op and what is missing when the config's optimizer would compile an op
    this machine cannot build."""
    op = compiled_optimizer_op(ds_config)
    if op is None:
        return
    problems = build_problems(op, tools or find_toolchain(needs_nvcc=on_gpu and op == "fused_adam"), on_gpu)
    if problems:
        name = {"fused_adam": "DeepSpeed's FusedAdam", "cpu_adam": "DeepSpeedCPUAdam"}[op]
        raise ConfigError(f"{source}: the optimizer is {name}, which DeepSpeed compiles at the first step, and "
                          f"this machine cannot build it: {'; '.join(problems)}. Set \"torch_adam\": true and "
                          f"\"fused\": true in optimizer.params (torch's fused AdamW, the same math, nothing to "
                          f"compile; ds_configs/zero3.json), or install the missing tools", "deepspeed_config")


# ------------------------------------------------------------------------------ the process group's ops
# The DeepSpeed ops built on first use (JIT) when the process group starts, unless the wheel has them prebuilt, by
# accelerator: the CPU shared-memory collectives. (Optimizer ops are checked by `check_buildable` instead.)
JIT_OPS = {"cpu": ("deepspeed_shm_comm",)}

def default_extensions_dir() -> str:
    """Where torch builds DeepSpeed's ops when TORCH_EXTENSIONS_DIR is unset: inside this Python environment
    (for a `make install` venv, the Makefile's .venv/torch_extensions), so they are built once per environment
    whatever directory dpo-ds starts from; ~/.cache/torch_extensions when the environment is read-only."""
    inside = Path(sys.prefix) / "torch_extensions"
    if os.access(inside if inside.is_dir() else sys.prefix, os.W_OK):
        return str(inside)
    return str(Path.home() / ".cache" / "torch_extensions")


def announce_op_build() -> None:
    """One line on stderr (local rank 0) before DeepSpeed compiles an op this environment has not built yet:
    the compile takes about a minute and prints nothing meanwhile."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    missing = [op for op in JIT_OPS.get(get_accelerator().device_name(), ())
               if not installed_ops.get(op) and not (root / op / f"{op}.so").is_file()]
    if missing and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"dpo-ds: building DeepSpeed op(s) {', '.join(missing)} into {root} (once per environment, about a "
              f"minute)", file=sys.stderr, flush=True)


def _built_at(path: Path) -> float | None:
    return path.stat().st_mtime if path.is_file() else None


@contextlib.contextmanager
def reporting_op_builds():
    """Around DeepSpeed's process-group start, where it loads (and, the first time, compiles) its JIT ops: its own
    "built successfully" line, printed on every rank at every start whether or not anything was built, is dropped;
    when an op was compiled now (its library is new or changed) local rank 0 says which, where and how long it took."""
    from deepspeed.accelerator import get_accelerator

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    libraries = {op: Path(root) / op / f"{op}.so" for op in JIT_OPS.get(get_accelerator().device_name(), ())} \
        if root else {}
    before = {op: _built_at(path) for op, path in libraries.items()}
    started = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):
        yield
    built = [op for op, path in libraries.items() if _built_at(path) != before[op]]
    if built and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"dpo-ds: built DeepSpeed op(s) {', '.join(built)} into {root} in {time.monotonic() - started:.0f} s",
              file=sys.stderr, flush=True)
