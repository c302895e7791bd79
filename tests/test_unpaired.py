"""Unpaired examples (KTO): paired data split into desirable and undesirable examples, each scored with a
mismatched completion for the KL reference point; the unit seam (data.for_unit)."""
from __future__ import annotations

import numpy as np
import pytest

from dpo_ds.data import DataError, TokenizedPairs, TokenizedUnpaired, collate, for_unit

pytestmark = pytest.mark.unit

PAIRS = TokenizedPairs(prompt=[[1, 5, 6], [1, 7], [1, 9, 9, 9]], chosen=[[8, 9, 2], [10, 2], [11, 12, 2]],
                       rejected=[[11, 2], [12, 4, 5, 2], [13, 2]], pair_ids=["f:1", "f:2", "f:4"], fingerprint="abc")


def test_split_pairs_gives_a_desirable_and_an_undesirable_example_per_pair_with_a_mismatched_completion():
    """Examples 2k (chosen, desirable) and 2k + 1 (rejected, undesirable) of pair k, in pair order; the mismatched
    completion of example i is example i - 2's completion (the previous pair's, same side; cyclic) after example
    i's own prompt."""
    u = for_unit(PAIRS, "unpaired", "f", "kto")
    assert isinstance(u, TokenizedUnpaired) and len(u) == 6
    assert u.labels.tolist() == [True, False] * 3
    completions = [PAIRS.chosen[0], PAIRS.rejected[0], PAIRS.chosen[1], PAIRS.rejected[1], PAIRS.chosen[2],
                   PAIRS.rejected[2]]
    for i in range(6):
        prompt, completion = u.sequence(0, i)
        assert prompt.tolist() == PAIRS.prompt[i // 2].tolist() and completion.tolist() == completions[i].tolist()
        prompt_kl, mismatched = u.sequence(1, i)
        assert prompt_kl.tolist() == prompt.tolist() and mismatched.tolist() == completions[(i - 2) % 6].tolist()
        assert u.length(i) == max(len(prompt) + len(completion), len(prompt) + len(mismatched))
    assert u.lengths().tolist() == [u.length(i) for i in range(6)]
    assert [u.pair_ids[i] for i in (0, 3)] == ["f:1 (chosen)", "f:2 (rejected)"]
    assert u.fingerprint != PAIRS.fingerprint  # a reference cache of the pairs is not one of these examples
    batch = collate(u, [2, 3], pad_id=0)  # rows: completions of examples 2, 3, then their mismatched completions
    assert batch["input_ids"][0, :4].tolist() == [1, 7, 10, 2] and batch["input_ids"][2, :5].tolist() == [1, 7, 8, 9, 2]


def test_pairs_stay_pairs_and_unpaired_rows_are_refused_for_a_pair_loss():
    assert for_unit(PAIRS, "pair", "f", "sigmoid") is PAIRS
    u = TokenizedUnpaired.split_pairs(PAIRS)
    with pytest.raises(DataError, match=r"^f: field 'label': .* loss_type sigmoid trains on preference pairs"):
        for_unit(u, "pair", "f", "sigmoid")
    assert np.array_equal(for_unit(u, "unpaired", "f", "kto").labels, u.labels)
