"""Where a sequence-parallel DPO forward keeps its memory (BENCHMARKS.md section 13): live tensor bytes, tracked
per allocation by a torch dispatch mode, in one forward + backward of dpo-ds's scoring path (BatchScorer, fused
lm_head, non-reentrant gradient checkpointing, sdpa routed through DeepSpeed's Ulysses attention at S > 1) on
one pair of two equally long sequences, without DeepSpeed engines (parameters and gradients are not counted:
they exist before the tracking starts or are accumulated outside it).

    python -m torch.distributed.run --nproc_per_node S benchmarks/sp_memory_probe.py LENGTH [LAYERS]

S = the number of ranks (all share the pair). Rank 0 prints one JSON object: the peak of live bytes in the
forward and in the backward, the live bytes after each decoder layer's forward and after the forward, the
allocations live at the forward's peak and at its end grouped by (op, module), and the attention kernels run.

    PROBE_OUT=PREFIX python -m torch.distributed.run --nproc_per_node S benchmarks/sp_memory_probe.py bench ARGS

runs `dpo-ds bench ARGS` (DeepSpeed engines, live reference, optimizer step) with every tensor tracked from the
process's start: each rank writes PREFIX.rankN.json (`bench` below).

    PROBE_OUT=PREFIX python -m torch.distributed.run --nproc_per_node S benchmarks/sp_memory_probe.py rss ARGS

runs `dpo-ds bench ARGS` untracked and writes, per rank, what its resident memory is made of before the first
step and after the last (`rss` below): file-backed (libraries' code and data) against anonymous (heap, tensors)
and shared memory, the largest mappings, the threads and the RSS high-water mark.
"""
import json
import os
import resource
import sys
import weakref
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_ds.compat import enable_activation_checkpointing
from dpo_ds.parallel import Parallel
from dpo_ds.scoring import fused_head
from dpo_ds.sequence_parallel import BatchScorer, setup

CONFIG = "benchmarks/configs/llama-32k-vocab/config.json"
MIB = 2 ** 20


class LiveTensors(TorchDispatchMode):
    """Bytes of the storages every op creates, until they are freed; the peak; where each was made."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}  # views of these are not new memory
        self.live: dict[int, tuple[int, str, str, tuple]] = {}  # storage id -> (bytes, op, module, shape)
        self.bytes = self.peak = 0
        self.peak_groups: list = []
        self.snapped = 0
        self.where = self.peak_where = "-"
        self.kernels = Counter()

    def group(self) -> list:
        groups = defaultdict(lambda: [0, 0, None])
        for size, op, where, shape in self.live.values():
            g = groups[(op, where)]
            g[0] += size
            g[1] += 1
            g[2] = g[2] or shape
        top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:16]
        return [dict(op=op, module=where, mib=round(s / MIB, 2), count=n, shape=list(shape))
                for (op, where), (s, n, shape) in top]

    def _forget(self, key: int) -> None:
        size = self.live.pop(key)[0]
        self.bytes -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "scaled_dot_product" in str(func) or "all_to_all" in str(func):
            self.kernels[str(func)] += 1
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or key in self.existing or storage.nbytes() == 0:
                continue
            self.live[key] = (storage.nbytes(), str(func), self.where, tuple(t.shape))
            self.bytes += storage.nbytes()
            weakref.finalize(storage, self._forget, key)
            if self.bytes > self.peak:
                self.peak = self.bytes
                self.peak_where = self.where
                if self.peak > self.snapped + 4 * MIB:  # the allocations live at (about) the peak
                    self.snapped, self.peak_groups = self.peak, self.group()
        return out


def rss_peak_mib() -> int:
    """The process's resident-set high-water mark (what dpo-ds bench reports as peak memory on CPU)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def label(tracker: LiveTensors, model) -> None:
    """Name the module each allocation is made in; count live bytes after each decoder layer's forward."""
    tracker.after_layer = []

    def enter(name):
        def hook(module, args, kwargs=None):
            module._outer = tracker.where
            tracker.where = name + (" (recompute)" if tracker.phase == "backward" else "")
        return hook

    def leave(name, layer):
        def hook(module, args, out):
            tracker.where = module._outer
            if layer and tracker.phase == "forward":
                tracker.after_layer.append(round(tracker.bytes / MIB, 2))
        return hook

    for name, module in model.named_modules():
        if name.count(".") <= 3 and name:
            module.register_forward_pre_hook(enter(name))
            module.register_forward_hook(leave(name, name.count(".") == 2 and ".layers." in name))


def main():
    length = int(sys.argv[1])
    config = AutoConfig.from_pretrained(CONFIG)
    if len(sys.argv) > 2:
        config.num_hidden_layers = int(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = Parallel.init(600, world)
    if world > 1:
        setup(parallel, config, "sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    enable_activation_checkpointing(model)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (2, length), generator=g)
    loss_mask = torch.ones(2, length, dtype=torch.long)
    loss_mask[:, : length // 8] = 0  # a prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
    tracker = LiveTensors(list(model.parameters()) + list(model.buffers()))
    tracker.phase = "forward"
    rss_start = rss_peak_mib()
    label(tracker, model)
    with tracker:
        sums, _, _ = BatchScorer(parallel, 0)(model, batch, 256, fused_head(model))
        forward = dict(rss_peak_mib=rss_peak_mib() - rss_start, peak_mib=round(tracker.peak / MIB, 2),
                       peak_in=tracker.peak_where, end_mib=round(tracker.bytes / MIB, 2),
                       after_layer_mib=tracker.after_layer,
                       held_at_peak=tracker.peak_groups, held_at_end=tracker.group())
        tracker.phase, tracker.peak, tracker.snapped = "backward", tracker.bytes, tracker.bytes
        (sums[0] - sums[1]).backward()
    report = dict(ranks=world, length=length, layers=config.num_hidden_layers, rss_start_mib=rss_start,
                  rss_peak_mib_above_start=rss_peak_mib() - rss_start, forward=forward,
                  backward_peak_mib=round(tracker.peak / MIB, 2), backward_peak_in=tracker.peak_where,
                  backward_held_at_peak=tracker.peak_groups, kernels=dict(tracker.kernels))
    if parallel.rank == 0:
        print(json.dumps(report, indent=1))


def bench() -> None:
    """`dpo-ds bench ARGS` (after `bench`) with every tensor tracked from the start (model states included):
    each rank writes its peak of live bytes, the allocations live then grouped by (op, module class; no_grad
    marks the reference's forward) and its RSS high-water mark to $PROBE_OUT.rankN.json."""
    from dpo_ds.cli import main as dpo_ds_main

    tracker = LiveTensors([])
    stack = []

    def enter(module, args):
        stack.append(tracker.where)
        tracker.where = type(module).__name__ + ("" if torch.is_grad_enabled() else " [no_grad]")

    def leave(module, args, out):
        tracker.where = stack.pop() if stack else "-"

    torch.nn.modules.module.register_module_forward_pre_hook(enter)
    torch.nn.modules.module.register_module_forward_hook(leave)
    sys.argv = ["dpo-ds", *sys.argv[1:]]
    try:
        with tracker:
            dpo_ds_main()  # not cli.entry: it ends the process without unwinding
    finally:
        report = dict(peak_mib=round(tracker.peak / MIB, 2), peak_in=tracker.peak_where,
                      rss_peak_mib=rss_peak_mib(), held_at_peak=tracker.peak_groups)
        with open(f"{os.environ['PROBE_OUT']}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(report, f, indent=1)


def memory_map() -> dict:
    """This process's resident memory now, from /proc/self/smaps: by kind (file-backed, anonymous, shared
    memory) and the 12 largest mappings by path (anonymous ones as [anon])."""
    kinds, paths, path = Counter(), Counter(), "[anon]"
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                path = head[5] if len(head) > 5 else "[anon]"
            elif head and head[0] in ("Rss:", "Anonymous:", "RssShmem:", "Shared_Clean:", "Private_Clean:"):
                kib = int(head[1])
                if head[0] == "Rss:":
                    paths[path] += kib
                    kinds["file" if path.startswith("/") and not path.startswith("/dev/shm") else
                          "shm" if path.startswith("/dev/shm") else "anon_or_special"] += kib
    with open("/proc/self/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return dict(rss_mib={k: round(v / 1024, 1) for k, v in kinds.items()},
                largest_mib={p: round(v / 1024, 1) for p, v in paths.most_common(12)}, threads=threads,
                torch_threads=torch.get_num_threads(), rss_peak_mib=rss_peak_mib())


def rss() -> None:
    """`dpo-ds bench ARGS` (after `rss`), untracked: each rank writes `memory_map()` before its first training
    step and after the run to $PROBE_OUT.rankN.json."""
    import dpo_ds.step
    from dpo_ds.cli import main as dpo_ds_main

    report = {}
    train_step = dpo_ds.step.train_step

    def first_step_noted(*args, **kwargs):
        report.setdefault("before_first_step", memory_map())
        return train_step(*args, **kwargs)

    dpo_ds.step.train_step = first_step_noted  # bench imports it from dpo_ds.step when it runs
    sys.argv = ["dpo-ds", "bench", *sys.argv[2:]]
    try:
        dpo_ds_main()
    finally:
        report["after_run"] = memory_map()
        report["modules"] = sorted({name.split(".")[0] for name in sys.modules})
        with open(f"{os.environ['PROBE_OUT']}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    {"bench": bench, "rss": rss}.get(sys.argv[1], main)()
