"""`dpo-ds env`: what to run first on a new cluster. One table (or --json) of the installed versions against
the tested ranges (setup.cfg), the accelerator, the attention kernels available, whether each DeepSpeed preset's
optimizer would compile an op and whether it could here, and, under a launcher (torchrun, srun, mpirun), the
process group's collective (NCCL on GPUs, gloo on CPU) and whether --dir is the same directory on every rank.

    dpo-ds env [--json] [--dir DIR]                     # this node
    srun -N 2 --ntasks-per-node=1 dpo-ds env --dir /shared/runs   # across nodes

Status: ok, warn (works, but not at its best here), fail, skip (needs a launcher). Exits 1 when a check fails (a version outside its range, an op that cannot be built, the collective or the
shared-storage check), else 0. Version problems are reported here rather than refused at start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from dpo_ds.console import emit
from dpo_ds.versions import installed_version, pip_spec, tested_ranges

HELP = __doc__
REPORTED = ("torch", "deepspeed", "transformers", "peft", "accelerate", "numpy", "datasets", "safetensors")
PRESETS = Path(__file__).resolve().parent.parent / "ds_configs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the rows as a JSON list instead of a table.")
    parser.add_argument("--dir", default=".", help="Directory that every rank must see as the same one (output_dir "
                                                   "or cache_dir; checked only under a launcher). Default: .")
    parser.add_argument("--timeout_s", type=float, default=120.0, help="Rendezvous and collective time limit.")


def row(check: str, value: str, status: str = "ok", detail: str = "") -> dict:
    return {"check": check, "value": value, "status": status, "detail": detail}


def version_rows() -> list[dict]:
    from packaging.version import InvalidVersion, Version

    ranges = tested_ranges(packages=REPORTED)
    rows = [row("python", platform.python_version())]
    for name in REPORTED:
        version, requirement = installed_version(name), ranges.get(name)
        spec = pip_spec(requirement) if requirement else "(not declared)"
        if version is None:
            rows.append(row(name, "not installed", "fail", f"tested: {spec}"))
            continue
        try:
            inside = requirement is None or requirement.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            inside = False
        rows.append(row(name, version, "ok" if inside else "fail", f"tested: {spec}"))
    return rows


def accelerator_rows() -> list[dict]:
    import torch
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator().device_name()
    rows = [row("deepspeed accelerator", accel, detail="DS_ACCELERATOR overrides DeepSpeed's guess")]
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        rows.append(row("cuda devices", f"{torch.cuda.device_count()} x {', '.join(names)}",
                        detail=f"torch built for CUDA {torch.version.cuda}; bf16 "
                               f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        rows.append(row("cuda devices", "none", "ok" if accel == "cpu" else "fail",
                        f"torch {'built for CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'}"))
    return rows


def attention_rows() -> list[dict]:
    import torch
    from transformers.utils import is_flash_attn_2_available

    sdpa = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    flash = is_flash_attn_2_available()
    return [row("attention: sdpa", "yes" if sdpa else "no", "ok" if sdpa else "fail", "torch's fused attention"),
            row("attention: flash_attention_2", "yes" if flash else "no", "ok" if flash or not torch.cuda.is_available()
                else "warn", "varlen kernel for padding_free (attn_implementation auto picks it with bf16 on CUDA)")]


def compiled_op_rows() -> list[dict]:
    from dpo_ds.compiled_ops import build_problems, compiled_optimizer_op, find_toolchain
    from dpo_ds.engines.ds_config import on_cpu

    tools, rows = None, []
    for preset in sorted(PRESETS.glob("*.json")):
        op = compiled_optimizer_op(json.loads(preset.read_text()))
        if op is None:
            rows.append(row(f"preset {preset.name}", "compiles nothing"))
            continue
        tools = tools or find_toolchain(needs_nvcc=not on_cpu())
        problems = build_problems(op, tools, on_gpu=not on_cpu())
        rows.append(row(f"preset {preset.name}", f"compiles {op}" + (" (prebuilt)" if tools.prebuilt.get(op) else ""),
                        "warn" if problems else "ok", "; ".join(problems) or "this machine can build it"))
    return rows


def process_group_rows(directory: str, timeout_s: float) -> list[dict]:
    """The collective and the shared-storage check across the launcher's ranks (none for one process)."""
    import torch

    from launcher.dist import all_reduce, check_shared_dirs, pick_backend, process_world_size
    from launcher.env import LauncherError, resolve

    backend = pick_backend()[1]
    if resolve(os.environ).world_size == 1:
        return [row(f"process group ({backend})", "1 process", "skip", "run under torchrun/srun/mpirun to check it"),
                row("shared storage", directory, "skip", "run under a launcher, ranks on several nodes, to check it")]
    from dpo_ds.parallel import Parallel

    started = time.monotonic()
    Parallel.init(timeout_s=timeout_s)
    world = process_world_size()
    total = all_reduce(torch.ones(1)).item()
    rows = [row(f"process group ({backend})", f"{world} ranks", "ok" if total == world else "fail",
                f"rendezvous + all_reduce in {time.monotonic() - started:.1f} s (sum {total:g}, expected {world})")]
    try:
        check_shared_dirs({"dir": directory})
        rows.append(row("shared storage", directory, "ok", f"the same directory on all {world} ranks"))
    except LauncherError as err:
        rows.append(row("shared storage", directory, "fail", str(err)))
    return rows


def collect(directory: str, timeout_s: float) -> list[dict]:
    return [*version_rows(), *accelerator_rows(), *attention_rows(), *compiled_op_rows(),
            *process_group_rows(directory, timeout_s)]


def format_table(rows: list[dict]) -> str:
    columns = ("check", "value", "status", "detail")
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns[:-1]]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, [*widths, 0])).rstrip()]
    lines += ["  ".join(r[c].ljust(w) for c, w in zip(columns, [*widths, 0])).rstrip() for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from launcher.dist import process_rank

    rows = collect(args.dir, args.timeout_s)
    if process_rank() == 0:
        emit(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 1 if any(r["status"] == "fail" for r in rows) else 0
