"""Checkpoint layout <-> in-memory layout, through transformers' own conversion mapping.

transformers 5 builds some models in a layout that differs from their checkpoints: Mixtral's
`block_sparse_moe.experts.N.w1/w2/w3.weight` and Qwen3-MoE's `mlp.experts.N.{gate,up,down}_proj.weight`
become 3-D fused `mlp.experts.gate_up_proj` / `down_proj` tensors; other models rename keys.
`from_pretrained` applies the model's checkpoint conversion mapping (`get_model_conversion_mapping`:
renamings, then at most one converter per key) and `save_pretrained` reverts it. Both directions are
reused here, never a table of families of our own:

- loading (`map_checkpoint`): each checkpoint key is renamed as `from_pretrained` renames it; a parameter
  fed by a converter becomes a `ConvertedTensor`, which builds any flat range of the converted parameter
  from the checkpoint tensors. Stacked per-expert tensors concatenated along dim 1 (the MoE converters:
  MergeModulelist(dim=0), Concatenate(dim=1)) lie in flat order one after the other, so any range is read
  straight from the files; another converter that starts by stacking experts is built one expert slice at a
  time (peak: one expert's tensors and their converted slice); any other reads and converts all of the
  parameter's source tensors at once.
- saving (`saved_layout`, `to_saved_layout`): the names, shapes and tensors `save_pretrained` writes:
  tied aliases dropped as it drops them, then the reverse conversion, applied one group of parameters at a
  time (the parameters one saved tensor is made from), so an exporter holds one group, not the model.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def _conversions(model, saving: bool) -> list:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    if saving:  # what revert_weight_conversion reverses (save_pretrained)
        used = getattr(model, "_weight_conversions", None)
        if used is not None:
            return list(used)
        return [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    return get_model_conversion_mapping(model)  # what from_pretrained applies


def _split(conversions):
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    return ([c for c in conversions if isinstance(c, WeightRenaming)],
            [c for c in conversions if isinstance(c, WeightConverter)])


def _apply_ops(converter, tensors: dict[str, list[torch.Tensor]], target: str, config) -> torch.Tensor:
    """Run `converter`'s operations on {source pattern: [tensors]} and return the tensor for `target`."""
    out = {pattern: list(values) for pattern, values in tensors.items()}
    for op in converter.operations:
        out = op.convert(out, source_patterns=converter.source_patterns, target_patterns=converter.target_patterns,
                         full_layer_name=target, config=config, missing_keys=None)
    for pattern, value in out.items():
        if pattern in target:
            return value[0] if isinstance(value, list) else value
    raise KeyError(f"{target}: the conversion produced {sorted(out)}")


class ConvertedTensor:
    """One model parameter built by a transformers WeightConverter from checkpoint tensors (see module doc).

    Reads like a checkpoint entry: `shape`, `torch_dtype`, `read_flat(start, out)`, `full()`. `read(entry)` and
    `read_range(entry, start, out)` read the checkpoint's own entries (dpo_ds.loading passes its readers)."""

    def __init__(self, name: str, converter, sources: dict[str, list], config, read: Callable, read_range: Callable):
        self.key = name
        self.converter, self.sources, self.config = converter, sources, config
        self._read, self._read_range = read, read_range
        dtypes = {entry.torch_dtype for entries in sources.values() for entry in entries}
        if len(dtypes) != 1:
            raise ValueError(f"{name}: its checkpoint tensors have different dtypes {sorted(map(str, dtypes))}")
        self.torch_dtype = dtypes.pop()
        meta = self._convert({p: [self._meta(e) for e in entries] for p, entries in sources.items()})
        self.shape = tuple(meta.shape)
        counts = {len(entries) for entries in sources.values()}
        ops = converter.operations
        from transformers.core_model_loading import Concatenate, MergeModulelist

        self.sliced = False  # built one dim-0 slice (expert) at a time
        if ops and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0 and len(counts) == 1:
            one = self._convert({p: [self._meta(entries[0])] for p, entries in sources.items()})
            self.sliced = tuple(one.shape) == (1, *self.shape[1:]) and self.shape[0] == counts.pop()
        self.slice_numel = meta[0].numel() if self.sliced else meta.numel()
        # Stacking per-expert tensors, then concatenating along dim 1 (gate ; up), puts expert e's sources one
        # after the other in flat order: any range is read straight from the files, nothing converted or kept.
        self.concatenated = self.sliced and all(
            isinstance(op, MergeModulelist) and op.dim == 0 or isinstance(op, Concatenate) and op.dim == 1
            for op in ops)
        self._cached: tuple[int, torch.Tensor] | None = None

    def _meta(self, entry) -> torch.Tensor:
        return torch.empty(entry.shape, dtype=entry.torch_dtype, device="meta")

    def _convert(self, tensors: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        return _apply_ops(self.converter, tensors, self.key, self.config)

    def _slice(self, index: int) -> torch.Tensor:
        """Flat slice `index` (one expert when sliced, else the whole tensor), cached: readers go in order."""
        if self._cached is None or self._cached[0] != index:
            self._cached = None
            picked = {p: (entries[index:index + 1] if self.sliced else entries) for p, entries in self.sources.items()}
            value = self._convert({p: [self._read(e) for e in entries] for p, entries in picked.items()})
            self._cached = (index, value.contiguous().view(-1))
        return self._cached[1]

    def read_flat(self, start: int, out: torch.Tensor) -> None:
        """Flat elements [start, start + out.numel()) of the converted tensor into `out` (a 1-D tensor)."""
        done, n = 0, out.numel()
        while done < n:
            index, offset = divmod(start + done, self.slice_numel)
            take = min(n - done, self.slice_numel - offset)
            if self.concatenated:
                self._read_concatenated(index, offset, out[done:done + take])
            else:
                out[done:done + take].copy_(self._slice(index)[offset:offset + take])
            done += take
        if start + n >= self.slice_numel * (self.shape[0] if self.sliced else 1):
            self._cached = None  # read to the end: free the last slice

    def _read_concatenated(self, index: int, offset: int, out: torch.Tensor) -> None:
        for pattern in self.converter.source_patterns:  # Concatenate's order
            if pattern not in self.sources or not out.numel():
                continue
            entry = self.sources[pattern][index]
            size = math.prod(entry.shape)
            if offset < size:
                take = min(out.numel(), size - offset)
                self._read_range(entry, offset, out[:take])
                out = out[take:]
                offset = 0
            else:
                offset -= size

    def full(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.torch_dtype)
        self.read_flat(0, out.view(-1))
        return out


def map_checkpoint(model, checkpoint: dict, known: set[str], read: Callable, read_range: Callable):
    """How `from_pretrained` would place each checkpoint key in `model` (whose parameter and persistent buffer
    names are `known`): ({model name: checkpoint key}, {model name: ConvertedTensor}, [unmatched keys]).
    Records the conversions used on the model (`_weight_conversions`), as from_pretrained does, so saving
    reverts exactly them."""
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    conversions = _conversions(model, saving=False)
    renamings, converters = _split(conversions)
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None) or None
    present = dict.fromkeys(known, True)  # rename_source_key asks .get(name) is not None
    direct: dict[str, str] = {}
    grouped: dict[str, tuple] = {}  # model name -> (converter, {pattern: [entries]})
    unmatched: list[str] = []
    for key in sorted(checkpoint, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, present)
        if renamed not in known and key in known:  # as from_pretrained: a key already in the model's layout
            renamed, pattern = key, None
        if renamed not in known:
            unmatched.append(key)
        elif pattern is None:
            direct[renamed] = key
        else:
            converter = by_pattern[pattern]
            first = converter.target_patterns[0]
            # a one-to-many converter (e.g. a fused qkv split into q, k, v) feeds every target from the same keys
            for target in converter.target_patterns:
                name = renamed.replace(first, target, 1)
                entry = grouped.setdefault(name, (converter, {p: [] for p in converter.source_patterns}))
                entry[1][pattern].append(checkpoint[key])
    converted = {}
    for name, (converter, sources) in grouped.items():
        sources = {p: entries for p, entries in sources.items() if entries}
        converted[name] = ConvertedTensor(name, converter, sources, model.config, read, read_range)
    model._weight_conversions = [c for c in conversions if c.was_used()]
    return direct, converted, unmatched


def state_tensors(model) -> dict[str, torch.Tensor]:
    """state_dict() names -> their live tensors (ZeRO-3 parameters included), tied aliases under each name."""
    persistent = set(model.state_dict().keys())
    out = {name: p for name, p in model.named_parameters(remove_duplicate=False) if name in persistent}
    out.update({name: b for name, b in model.named_buffers(remove_duplicate=False) if name in persistent})
    for ignored in getattr(model, "_keys_to_ignore_on_save", None) or ():
        out.pop(ignored, None)
    return out


def saved_layout(model) -> tuple[list[list[str]], dict[str, tuple[int, ...]]]:
    """What `save_pretrained(model)` writes, without touching a weight: the groups of state-dict names that
    each make one or more saved tensors (in the model's order), and the saved tensors' names and shapes."""
    from transformers.core_model_loading import rename_source_key, revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    live = state_tensors(model)
    # meta stand-ins: remove_tied_weights_from_state_dict then tells aliases apart by the live tensor's identity
    meta = {name: torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device="meta")
            for name, t in live.items()}
    kept = remove_tied_weights_from_state_dict(meta, model)
    _, converters = _split([c.reverse_transform() for c in _conversions(model, saving=True)[::-1]])
    groups: dict[str, list[str]] = {}
    for name in kept:
        # at most one converter, no renaming: what `apply_converters` does where it exists (transformers > 5.17)
        renamed, pattern = rename_source_key(name, [], converters)
        groups.setdefault(renamed if pattern is not None else name, []).append(name)
    shapes = {name: tuple(t.shape) for name, t in revert_weight_conversion(model, dict(kept)).items()}
    return list(groups.values()), shapes


def to_saved_layout(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One group of `saved_layout` (state-dict name -> tensor) as the tensors save_pretrained writes."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)
