"""No device-to-host sync per micro-step in dpo-ds's own scoring and statistics (issue 16, finding 7).

On meta tensors every data-dependent operation (`.item()`, `float()`, `nonzero()`, `int(x.max())`) raises, so
a path that runs on meta tensors cannot make the GPU wait. benchmarks/gpu.sh checks the same paths on a GPU with
torch.cuda.set_sync_debug_mode("error")."""
from __future__ import annotations

import torch

from dpo_ds.scoring import _varlen_attention_kwargs, forward_logps
from dpo_ds.logprobs import head_sequence_logps, scored_positions, sequence_logps
from dpo_ds.losses import LossOutput, PairLogps
from dpo_ds.metrics import PairStats
from dpo_ds.parallel import Parallel

META = torch.device("meta")
LOSS_MASK = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)


def test_meta_tensors_reject_data_dependent_ops():
    for op in (lambda t: t.nonzero(), lambda t: float(t.sum()), lambda t: int(t.max())):
        try:
            op(torch.ones(3, device=META))
        except (NotImplementedError, RuntimeError):
            continue
        raise AssertionError("meta tensors no longer catch device syncs: this test file proves nothing")


def test_fused_head_scoring_needs_no_sync_when_given_the_scored_positions():
    ids = torch.randint(0, 11, (2, 6))
    hidden = torch.randn(2, 6, 8, device=META, requires_grad=True)
    weight = torch.randn(11, 8, device=META, requires_grad=True)
    sums, tokens = head_sequence_logps(hidden, weight, ids.to(META), LOSS_MASK.to(META), 4,
                                       scored=scored_positions(LOSS_MASK).to(META))
    sums.sum().backward()
    assert sums.shape == tokens.shape == (2,) and hidden.grad.shape == hidden.shape
    # and the scored positions from the CPU mask are what the device would have computed
    cpu_hidden, cpu_weight = torch.randn(2, 6, 8), torch.randn(11, 8)
    given = head_sequence_logps(cpu_hidden, cpu_weight, ids, LOSS_MASK, 4, scored=scored_positions(LOSS_MASK))
    derived = head_sequence_logps(cpu_hidden, cpu_weight, ids, LOSS_MASK, 4)
    assert all(torch.equal(a, b) for a, b in zip(given, derived))


class _MetaEngine:
    """Stands in for a DeepSpeed engine whose device is the GPU: logits on meta, config says flash-attention."""

    device = META

    def __init__(self):
        self.module = type("M", (), {"config": type("C", (), {"_attn_implementation": "flash_attention_2"})()})()
        self.kwargs = None

    def __call__(self, input_ids, use_cache, **kwargs):
        self.kwargs = kwargs
        return type("Out", (), {"logits": torch.randn(*input_ids.shape, 11, device=META)})()


def test_packed_forward_takes_sequence_metadata_from_the_cpu_batch():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    lengths = [3, 5, 2, 4]
    batch = {"input_ids": torch.randint(0, 11, (1, sum(lengths))),
             "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
             "loss_mask": torch.tensor([[p > 0 for n in lengths for p in range(n)]]),
             "sequence_ids": torch.tensor([[j for j, n in enumerate(lengths) for _ in range(n)]])}
    engine = _MetaEngine()
    sums, tokens, _ = forward_logps(engine, batch, chunk_size=4, head=None)
    assert sums.shape == tokens.shape == (4,)
    assert set(engine.kwargs) == {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    # the same values transformers would recompute from the position ids in every layer
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    mine = _varlen_attention_kwargs(batch["position_ids"], "cpu")
    assert torch.equal(mine["cu_seq_lens_q"], cu_q) and torch.equal(mine["cu_seq_lens_k"], cu_k)
    assert mine["max_length_q"] == int(max_q) == mine["max_length_k"] == int(max_k) == 5


def test_packed_attention_takes_the_sequence_bounds_from_the_cpu_batch():
    """sdpa_packed, given the cu_seq_lens forward_logps passes, never reads them back from the device."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dpo_ds.packed_attention import per_sequence

    lengths = [3, 5, 2]
    kwargs = _varlen_attention_kwargs(torch.tensor([[p for n in lengths for p in range(n)]]), META)
    query, key = torch.randn(1, 4, 10, 8, device=META), torch.randn(1, 2, 10, 8, device=META)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    out, _ = per_sequence(sdpa_attention_forward)(module, query, key, key, None, cu_seq_lens_q=kwargs["cu_seq_lens_q"])
    assert out.shape == (1, 10, 4, 8)


def test_sequence_logps_on_device_without_sync():
    ids = torch.randint(0, 11, (1, 6)).to(META)
    sums, tokens = sequence_logps(torch.randn(1, 6, 11, device=META), ids, LOSS_MASK[:1].to(META), 4,
                                  torch.tensor([[0, 0, 0, 1, 1, 1]], device=META), 2)
    assert sums.shape == tokens.shape == (2,)


def test_pair_stats_accumulate_on_the_device():
    def pairs(device):
        t = lambda *v: torch.tensor(v, device=device)  # noqa: E731
        lp = PairLogps(t(-1.0, -2.0), t(-3.0, -1.5), t(-1.2, -2.5), t(-2.0, -1.0), t(4.0, 5.0), t(3.0, 2.0))
        out = LossOutput(losses=t(0.5, 0.25), chosen_rewards=t(0.2, 0.05), rejected_rewards=t(-0.1, -0.05))
        return lp, out

    on_meta = PairStats(Parallel(), META)
    on_meta.add_pairs(*pairs(META), real_tokens=14, padded_tokens=20)  # would raise on any float()/item()
    assert on_meta.sums.device == META
    stats, (lp, out) = PairStats(Parallel(), torch.device("cpu")), pairs("cpu")
    stats.add_pairs(lp, out, real_tokens=14, padded_tokens=20)
    assert stats.total("loss") == 0.75 and stats.total("correct") == 2.0 and stats.total("real_tokens") == 14
    assert stats.total("kl_chosen") == float((lp.policy_chosen - lp.ref_chosen).sum())  # the same float32 sum
