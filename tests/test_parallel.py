"""The parallel context: rank layout (data-parallel x sequence-parallel) and single-process collectives."""
from __future__ import annotations

import pytest
import torch

from dpo_ds.parallel import Parallel

# world 8: for each S, (data-parallel rank, sequence-parallel rank) of global ranks 0..7, written out
LAYOUTS = {
    1: ([0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 0, 0, 0]),
    2: ([0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 0, 1, 0, 1, 0, 1]),
    4: ([0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 0, 1, 2, 3]),
}


@pytest.mark.parametrize("s", sorted(LAYOUTS))
def test_rank_layout_at_world_8(s):
    dp_ranks, sp_ranks = LAYOUTS[s]
    contexts = [Parallel(rank=r, world_size=8, sequence_parallel_size=s) for r in range(8)]
    assert [p.data_parallel_rank for p in contexts] == dp_ranks
    assert [p.sequence_parallel_rank for p in contexts] == sp_ranks
    assert {p.data_parallel_size for p in contexts} == {8 // s}
    assert [p.is_main for p in contexts] == [True] + [False] * 7
    # every (data-parallel rank, sequence-parallel rank) names exactly one global rank
    assert len({(p.data_parallel_rank, p.sequence_parallel_rank) for p in contexts}) == 8


def test_single_process_collectives_are_identities():
    p = Parallel()
    assert (p.rank, p.world_size, p.data_parallel_rank, p.data_parallel_size, p.sequence_parallel_rank) == (0, 1, 0, 1, 0)
    assert p.is_main and p.device == torch.device("cpu")
    t = torch.tensor([1.5, -2.0, 3.0], dtype=torch.float64)
    assert torch.equal(p.sum_over_data(t), t) and torch.equal(p.sum_over_data(t, "max"), t)
    assert p.gather_over_data({"a": [1, 2]}) == [{"a": [1, 2]}]
    p.barrier()
    assert p.on_rank0("computing", lambda: {"x": 3}) == {"x": 3}
    with pytest.raises(ValueError, match="boom"):
        p.on_rank0("failing", lambda: (_ for _ in ()).throw(ValueError("boom")))
    p.check_shared_dirs({"output_dir": "/nonexistent/anywhere"})  # one process: nothing to compare


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="op must be one of"):
        Parallel().sum_over_data(torch.ones(1), "mean")
