"""ZeRO-3 loading of a Hugging Face causal LM with memory bounded by one tensor, on every rank.

`load_sharded_pretrained` is a drop-in replacement for `engines.models.load_sharded_model`. transformers'
own ZeRO-3 path (`from_pretrained` under `HfDeepSpeedConfig`) partitions the model at construction but
then has rank 0 open every safetensors file and keep all of its tensors referenced until loading ends:
rank 0 holds the whole checkpoint (as memory-mapped file pages, counted in its RSS) on top of its
partition. Here instead:

1. the model is built with `from_config` inside `deepspeed.zero.Init` (partitioned as each module is
   constructed; weight init skipped since every weight is overwritten); no weight is read;
2. every rank reads only the safetensors headers, and all ranks agree on a plan: checkpoint key ->
   parameter (tied aliases resolved; keys renamed and per-expert tensors fused as from_pretrained does,
   with transformers' own conversion mapping: dpo_ds.layout), with missing / unexpected keys and shape
   mismatches reported by name before any collective runs;
3. parameters are filled one at a time, straight into their ZeRO partitions: rank 0 reads the byte
   range of each rank's partition from the file (plain reads, no mmap: page-cache pages are not part
   of a process's RSS) in chunks of at most 16 MiB, keeps its own and sends the others with
   point-to-point sends. No rank ever materialises a whole parameter. Parameters whose partitions are
   not plain tensors (NVMe offload, a partition group smaller than the world) fall back to
   `GatheredParameters([p], modifier_rank=0)` with rank 0 reading into the gathered tensor. Persistent
   buffers (never partitioned) are read by rank 0 and broadcast.

Peak per rank: its partition + one 16 MiB chunk (rank 0: two). zero.Init's broadcast of each freshly
constructed (uninitialised) parameter from rank 0 is skipped, as every parameter is overwritten and the
broadcast would make every rank touch the full tensor. On glibc, freed heap memory is handed back to
the OS (`malloc_trim`) after each module is partitioned and each tensor is loaded, so a fragmented heap
does not keep RSS above the live data.

Only .safetensors checkpoints are supported (a single file or an index); anything else raises LoadError.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dpo_ds.families import load_model_config
from dpo_ds.layout import map_checkpoint
from dpo_ds.safetensors_io import (
    STAGING_BYTES,
    LoadError,
    TensorEntry,
    checkpoint_files,
    read_headers,
    read_into,
    read_range,
    read_tensor,
)
from launcher.dist import all_reduce, broadcast_, process_rank, process_world_size, scatter_

_MAX_LISTED = 8


_LIBC = None


def release_free_memory() -> None:
    """Return free heap pages to the OS (glibc malloc_trim); a no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _transformers_contexts() -> list:
    """What transformers itself enters around zero.Init: skip weight init (every weight is overwritten) and
    keep RoPE `arange` buffers in their own dtype; `set_zero3_state` stops a nested zero.Init should an
    HfDeepSpeedConfig happen to be alive."""
    from transformers.initialization import no_init_weights

    contexts = [no_init_weights()]
    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change

        contexts.append(prevent_arange_dtype_change())
    except ImportError:  # older transformers: zero.Init does not touch arange there
        pass
    return contexts


def _no_nested_zero_init():
    try:
        from transformers.modeling_utils import set_zero3_state
    except ImportError:
        return contextlib.nullcontext()
    return set_zero3_state()


def _trimming_zero_init(ds_config: dict[str, Any]):
    """deepspeed.zero.Init that hands freed memory back after partitioning each module's parameters."""
    import deepspeed

    class TrimmingInit(deepspeed.zero.Init):
        def _post_init_method(self, module):
            super()._post_init_method(module)
            if any(True for _ in module.parameters(recurse=False)):
                release_free_memory()

        if hasattr(deepspeed.zero.Init, "_zero_init_param") and hasattr(deepspeed.zero.Init,
                                                                         "_convert_to_deepspeed_param"):
            def _zero_init_param(self, param):
                # DeepSpeed broadcasts rank 0's initial values here; every value is overwritten by the loader.
                self._convert_to_deepspeed_param(param)
                param.partition()

    return TrimmingInit(config_dict_or_path=ds_config)


def build_zero3_model(config, ds_config: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool,
                      attn_implementation: str | None = None):
    """An uninitialised causal LM of `config`, partitioned by zero.Init as it is constructed."""
    from transformers import AutoModelForCausalLM

    # Import the model's module first. A class created inside zero.Init gets DeepSpeed's __init__ wrapper
    # before its own class decorators run, and zero.Init's exit then restores the undecorated __init__: the
    # next model built would lack what the decorator sets (transformers' MoE experts: `config`).
    with contextlib.suppress(KeyError, ValueError):
        AutoModelForCausalLM._model_mapping[type(config)]
    with contextlib.ExitStack() as stack:
        for ctx in _transformers_contexts():
            stack.enter_context(ctx)
        stack.enter_context(_trimming_zero_init(ds_config))
        stack.enter_context(_no_nested_zero_init())
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 attn_implementation=attn_implementation)
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _ignored(patterns, key: str) -> bool:
    return any(re.search(p, key) for p in (patterns or ()))


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def plan_loading(model, checkpoint: dict[str, TensorEntry], source: str):
    """[(checkpoint key, target tensor, kind)] with kind "param" or "buffer"; raises LoadError on any
    missing or unexpected key or shape mismatch (the same outcome on every rank: headers only).

    Keys are placed as from_pretrained places them (dpo_ds.layout: transformers' conversion mapping, base
    model prefix); a parameter built by a converter from several checkpoint tensors (fused MoE experts) is
    added to `checkpoint` under its own name as a layout.ConvertedTensor."""
    aliases: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: one tensor, several names
        aliases.setdefault(id(p), (p, []))[1].append(name)
    persistent = set(model.state_dict().keys())
    buffers = {name: b for name, b in model.named_buffers() if name in persistent}
    known = {name for _, names in aliases.values() for name in names} | set(buffers)
    try:
        by_name, converted, unmatched = map_checkpoint(model, checkpoint, known, read_tensor, read_range)
    except ValueError as err:
        raise LoadError(f"{source}: {err}") from None
    for name, tensor in converted.items():
        checkpoint[name] = tensor
        by_name[name] = name
    unexpected = [k for k in unmatched if not _ignored(getattr(model, "_keys_to_ignore_on_load_unexpected", None), k)]
    plan, missing, mismatched = [], [], []
    for p, names in aliases.values():
        key = next((by_name[n] for n in names if n in by_name), None)
        if key is None:
            if not all(_ignored(getattr(model, "_keys_to_ignore_on_load_missing", None), n) for n in names):
                missing.append(names[0])
            continue
        plan.append((key, p, "param"))
    for name, b in buffers.items():
        if name in by_name:
            plan.append((by_name[name], b, "buffer"))
        elif not _ignored(getattr(model, "_keys_to_ignore_on_load_missing", None), name):
            missing.append(name)
    for key, target, _ in plan:
        want = tuple(getattr(target, "ds_shape", target.shape))
        if tuple(checkpoint[key].shape) != want:
            mismatched.append(f"{key} {tuple(checkpoint[key].shape)} vs model {want}")
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected in the checkpoint: {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listed(mismatched)}")
    if problems:
        raise LoadError(f"{source}: checkpoint does not match the model built from its config.json ("
                        + "; ".join(problems) + ")")
    return plan


@torch.no_grad()
def _broadcast_into(target: torch.Tensor, entry: TensorEntry) -> None:
    """Rank 0 reads `entry`, every rank receives it and copies it into its (unpartitioned) `target`."""
    value = read_tensor(entry) if process_rank() == 0 else torch.empty(entry.shape, dtype=entry.torch_dtype)
    value = value.to(target.device)
    broadcast_(value, src=0)
    target.copy_(value)


def _direct_partition_ok(param) -> bool:
    """True when `param`'s ZeRO-3 partition is a plain tensor we can fill in place: rank r of the world holds
    flat elements [r * s, (r + 1) * s) of the parameter in `ds_tensor` (s = ds_tensor.ds_numel)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    ds_tensor = getattr(param, "ds_tensor", None)
    if ds_tensor is None or getattr(param, "ds_status", None) is not ZeroParamStatus.NOT_AVAILABLE:
        return False
    if str(getattr(ds_tensor, "final_location", None)).lower().endswith("nvme"):
        return False
    group = getattr(param, "ds_process_group", None)
    world = process_world_size()
    group_size = dist.get_world_size(group=group) if dist.is_initialized() else 1
    return group_size == world and ds_tensor.numel() == ds_tensor.ds_numel and ds_tensor.is_contiguous() \
        and ds_tensor.ds_numel * world >= param.ds_numel


@torch.no_grad()
def _load_into_partitions(param, entry: TensorEntry) -> None:
    """Rank 0 reads every rank's slice of `entry` chunk by chunk and scatters it; each rank writes its own
    ds_tensor. The last partition may be padded: its padding is left as it is."""
    rank = process_rank()
    world = process_world_size()
    part = param.ds_tensor
    size, numel = part.ds_numel, param.ds_numel
    file_dtype = entry.torch_dtype
    # rank 0 stages one chunk per rank
    step = max(1, STAGING_BYTES // (world * torch.empty((), dtype=file_dtype).element_size()))
    if world == 1 and part.device.type == "cpu" and part.dtype == file_dtype:
        read_range(entry, 0, part.narrow(0, 0, min(size, numel)))
        return
    for c in range(0, size, step):
        n = min(step, size - c)
        chunks = None
        if rank == 0:
            chunks = [torch.zeros(n, dtype=file_dtype) for _ in range(world)]
            for r, chunk in enumerate(chunks):
                valid = max(0, min(n, numel - r * size - c))
                if valid:
                    read_range(entry, r * size + c, chunk.narrow(0, 0, valid))
        mine = max(0, min(n, numel - rank * size - c))
        received = torch.empty(n, dtype=part.dtype, device=part.device)
        scatter_(received, chunks, src=0)
        if mine:
            part.narrow(0, c, mine).copy_(received.narrow(0, 0, mine))


@torch.no_grad()
def load_weights(plan, checkpoint: dict[str, TensorEntry]) -> None:
    """Fill every planned tensor from the checkpoint, one tensor at a time (every rank must call this)."""
    import deepspeed

    rank = process_rank()
    for key, target, kind in plan:
        entry = checkpoint[key]
        entry.torch_dtype  # unsupported dtypes fail here, on every rank, before any collective
        if kind == "param" and hasattr(target, "ds_id"):
            direct = _direct_partition_ok(target)
            # every rank must take the same path
            direct = int(all_reduce(torch.tensor([0 if direct else 1])).item()) == 0
            if direct:
                _load_into_partitions(target, entry)
            else:
                with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                    if rank == 0:
                        read_into(entry, target.data)
        else:  # buffers (never partitioned) and parameters ZeRO does not manage
            _broadcast_into(target.data, entry)
        if kind == "param":
            target._is_hf_initialized = True
        release_free_memory()


def load_sharded_pretrained(path: str, ds_config: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool,
                            attn_implementation: str | None = None):
    """Drop-in for `engines.models.load_sharded_model`: the model at `path`, ZeRO-3 partitioned, with no rank ever
    holding more than its partition plus one tensor. Every rank must call it, in the same order."""
    from transformers import GenerationConfig

    config = load_model_config(path, trust_remote_code)
    files = checkpoint_files(path)
    checkpoint = read_headers(files)
    model = build_zero3_model(config, ds_config, dtype, trust_remote_code, attn_implementation)
    plan = plan_loading(model, checkpoint, str(path))
    load_weights(plan, checkpoint)
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()  # as from_pretrained leaves it
    return model
