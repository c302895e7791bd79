"""Chunked sequence log-probs against a plain per-sequence computation written out here."""
from __future__ import annotations

import pytest
import torch

from dpo_ds.data import TokenizedPairs, collate
from dpo_ds.logprobs import sequence_logps

N, T, V = 4, 11, 13
# prompt length, completion length per row; T - prompt - completion is right padding
LAYOUT = [(3, 5), (1, 10), (4, 2), (6, 5)]  # row 1: completion from position 1; row 3: no padding


def make_batch(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, T, V, generator=g) * 3).to(dtype)
    input_ids = torch.randint(0, V, (N, T), generator=g)
    loss_mask = torch.zeros(N, T, dtype=torch.bool)
    for n, (p, c) in enumerate(LAYOUT):
        loss_mask[n, p:p + c] = True
        input_ids[n, p + c:] = 0  # padding id
    return logits, input_ids, loss_mask


def reference(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """Per sequence: sum over completion positions t of log_softmax(logits[t - 1])[input_ids[t]]."""
    sums, counts = [], []
    for n in range(logits.shape[0]):
        total = torch.zeros((), dtype=torch.float32)
        count = 0
        for t in range(1, logits.shape[1]):
            if loss_mask[n, t]:
                total = total + torch.log_softmax(logits[n, t - 1].float(), dim=-1)[input_ids[n, t]]
                count += 1
        sums.append(total)
        counts.append(float(count))
    return torch.stack(sums), torch.tensor(counts)


def unused_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Logit positions whose prediction is not a completion token: targets in the prompt or padding, and the
    last position (it predicts nothing)."""
    unused = torch.ones_like(loss_mask)
    unused[:, :-1] = ~loss_mask[:, 1:]
    return unused


def test_matches_plain_computation():
    logits, ids, mask = make_batch()
    sums, counts = sequence_logps(logits, ids, mask, chunk_size=4)
    ref_sums, ref_counts = reference(logits, ids, mask)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-5)
    assert counts.tolist() == ref_counts.tolist() == [5.0, 10.0, 2.0, 5.0]
    assert sums.dtype == torch.float32 and sums.shape == (N,)
    assert (sums < 0).all()


def test_off_by_one_would_be_caught():
    """The reference is sensitive to the shift: an unshifted computation gives other values."""
    logits, ids, mask = make_batch()
    sums, _ = sequence_logps(logits, ids, mask)
    unshifted = torch.stack([
        (torch.log_softmax(logits[n], -1).gather(-1, ids[n].unsqueeze(-1)).squeeze(-1) * mask[n]).sum()
        for n in range(N)])
    assert not torch.allclose(sums, unshifted, atol=1e-3)


def test_prompt_and_padding_contribute_nothing():
    logits, ids, mask = make_batch()
    base, _ = sequence_logps(logits, ids, mask, chunk_size=3)
    unused = unused_positions(mask)
    noise = torch.randn(N, T, V, generator=torch.Generator().manual_seed(9)) * 1e3
    perturbed = torch.where(unused.unsqueeze(-1), logits + noise, logits)
    ids2 = torch.where(mask, ids, (ids + 5) % V)  # other prompt/padding ids too
    ids2[:, 0] = (ids[:, 0] + 1) % V
    changed, _ = sequence_logps(perturbed, ids2, mask, chunk_size=3)
    torch.testing.assert_close(changed, base, rtol=0, atol=0)
    # control: a used position does change its row (and only its row)
    used = perturbed.clone()
    used[0, 3] += noise[0, 3]  # row 0: position 3 predicts the 2nd completion token
    moved, _ = sequence_logps(used, ids2, mask, chunk_size=3)
    assert moved[0] != base[0] and torch.equal(moved[1:], base[1:])


def test_gradient_is_zero_on_prompt_and_padding_positions():
    logits, ids, mask = make_batch()
    logits.requires_grad_(True)
    sums, _ = sequence_logps(logits, ids, mask, chunk_size=3)
    sums.sum().backward()
    unused = unused_positions(mask)
    assert (logits.grad[unused] == 0).all()
    assert (logits.grad[~unused].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("chunk_size", [1, 3, T - 1, T, 4 * T])
def test_chunk_sizes_agree_in_values_and_gradients(chunk_size):
    logits, ids, mask = make_batch(seed=1)
    weights = torch.tensor([0.5, -1.0, 2.0, 1.5])  # a loss that weights rows differently

    leaf = logits.clone().requires_grad_(True)
    ref_sums, _ = reference(leaf, ids, mask)
    (ref_sums * weights).sum().backward()

    x = logits.clone().requires_grad_(True)
    sums, counts = sequence_logps(x, ids, mask, chunk_size=chunk_size)
    (sums * weights).sum().backward()
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x.grad, leaf.grad, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == [5.0, 10.0, 2.0, 5.0]
    # and without autograd (the reference-model path)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(logits, ids, mask, chunk_size=chunk_size)[0], ref_sums,
                                   rtol=1e-6, atol=1e-5)


def test_bf16_logits_chunked_with_gradients():
    logits32, ids, mask = make_batch(seed=2)
    x = logits32.to(torch.bfloat16).requires_grad_(True)
    sums, _ = sequence_logps(x, ids, mask, chunk_size=3)  # chunk smaller than T
    assert sums.dtype == torch.float32
    sums.sum().backward()
    assert x.grad.dtype == torch.bfloat16

    # the same bf16 values, upcast and computed in one piece: same result and gradient
    y = logits32.to(torch.bfloat16).requires_grad_(True)
    ref_sums, _ = reference(y, ids, mask)
    ref_sums.sum().backward()
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.float(), y.grad.float(), rtol=1e-2, atol=1e-3)
    # and close to the fp32 logits the bf16 ones were rounded from
    torch.testing.assert_close(sums, reference(logits32, ids, mask)[0], rtol=2e-2, atol=0.1)


def test_no_fp32_logits_of_the_whole_batch_are_kept_for_backward():
    """Between forward and backward, only bf16 chunks (views of the input) are held, never fp32 [N, T, V]."""
    n, t, v, chunk = 2, 40, 600, 8
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(n, t, v, generator=g).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, v, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[:, :10] = False

    def saved_fp32_elements(fn) -> int:
        """Largest float32 tensor autograd saves for backward while fn runs."""
        saved = []

        def pack(x):
            if x.dtype == torch.float32:
                saved.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = fn()
        return max(saved, default=0), out

    biggest, (sums, _) = saved_fp32_elements(lambda: sequence_logps(logits, ids, mask, chunk_size=chunk))
    assert biggest < n * chunk * v  # at most per-position values, never a chunk of fp32 logits
    # control: the plain computation does keep fp32 logits of the whole batch, which the check would catch
    naive, _ = saved_fp32_elements(lambda: reference(logits, ids, mask))
    full, _ = saved_fp32_elements(lambda: logits.float().log_softmax(-1))
    assert full >= n * (t - 1) * v and naive >= v

    sums.sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    reference(logits, ids, mask)[0].sum().backward()
    torch.testing.assert_close(grad.float(), logits.grad.float(), rtol=1e-2, atol=1e-3)


def test_on_a_collated_batch():
    """collate + sequence_logps: rows [0, B) score prompt+chosen's chosen tokens, [B, 2B) the rejected ones."""
    pairs = TokenizedPairs(prompt=[[1, 5, 6], [1, 7]], chosen=[[8, 9, 2], [10, 2]], rejected=[[11, 2], [12, 4, 5, 2]],
                           pair_ids=["a", "b"])
    batch = collate(pairs, [0, 1], pad_id=3)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, batch["input_ids"].shape[1], V, generator=g)
    sums, counts = sequence_logps(logits, batch["input_ids"], batch["loss_mask"], chunk_size=2)
    assert counts.tolist() == [3.0, 2.0, 2.0, 4.0]
    for row, (prompt, completion) in enumerate([(pairs.prompt[0], pairs.chosen[0]), (pairs.prompt[1], pairs.chosen[1]),
                                                (pairs.prompt[0], pairs.rejected[0]), (pairs.prompt[1], pairs.rejected[1])]):
        expected = sum(torch.log_softmax(logits[row, len(prompt) + j - 1], -1)[tok] for j, tok in enumerate(completion))
        torch.testing.assert_close(sums[row], expected, rtol=1e-6, atol=1e-5)


def test_chunked_token_logps_gradcheck_float64():
    from dpo_ds.logprobs import token_logps

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))
    assert torch.autograd.gradcheck(lambda x: token_logps(x, targets, 2), (logits,))
    want = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(token_logps(logits, targets, 3), want, atol=1e-12)


# ------------------------------------------------------------------ scoring inside the output projection
D = 6


def make_hidden(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    _, ids, mask = make_batch(seed)
    return torch.randn(N, T, D, generator=g).to(dtype), (torch.randn(V, D, generator=g) * 2).to(dtype), ids, mask


@pytest.mark.parametrize("chunk_size", [1, 4, 3 * T, 1000])  # 1: vocab chunks of a few rows; 1000: one chunk
def test_head_logps_match_the_plain_projection_in_values_and_gradients(chunk_size):
    from dpo_ds.logprobs import head_sequence_logps

    hidden, weight, ids, mask = make_hidden(5)
    row_weights = torch.tensor([0.5, -1.0, 2.0, 1.5])
    h_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_sums, ref_counts = reference(h_ref @ w_ref.T, ids, mask)  # the logits, whole, then log_softmax per token
    (ref_sums * row_weights).sum().backward()

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    sums, counts = head_sequence_logps(h, w, ids, mask, chunk_size=chunk_size)
    (sums * row_weights).sum().backward()
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-5)
    assert counts.tolist() == ref_counts.tolist()
    # fp32, other summation order (vocab chunks): gradients of size ~10 agree to ~1e-6 relative
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


def test_head_logps_of_a_packed_row_match_the_padded_rows():
    """One packed row [seq0 seq1 ...] scores each sequence as its own right-padded row does."""
    from dpo_ds.logprobs import head_sequence_logps

    pairs = TokenizedPairs(prompt=[[1, 5, 6], [1, 7]], chosen=[[8, 9, 2], [10, 2]], rejected=[[11, 2], [12, 4, 5, 2]],
                           pair_ids=["a", "b"])
    padded, packed = collate(pairs, [0, 1], pad_id=3), collate(pairs, [0, 1], pad_id=3, packed=True)
    g = torch.Generator().manual_seed(6)
    table, weight = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g)
    want, want_counts = head_sequence_logps(table[padded["input_ids"]], weight, padded["input_ids"],
                                            padded["loss_mask"], 2)
    got, got_counts = head_sequence_logps(table[packed["input_ids"]], weight, packed["input_ids"],
                                          packed["loss_mask"], 2, packed["sequence_ids"], 4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got_counts.tolist() == want_counts.tolist() == [3.0, 2.0, 2.0, 4.0]


def test_head_token_logps_gradcheck_float64():
    from dpo_ds.logprobs import _HeadTokenLogps

    torch.manual_seed(0)
    hidden = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 8, 3, 3, 5, 1, 8])
    for chunk in (2, 7):  # vocab chunks of 2 rows (targets in several chunks) and of all 9
        assert torch.autograd.gradcheck(lambda h, w: _HeadTokenLogps.apply(h, w, targets, chunk), (hidden, weight))


def test_head_logps_never_hold_logits_of_all_positions():
    """Neither autograd's saved tensors nor any tensor made in the forward or backward reaches K x V elements."""
    from dpo_ds.logprobs import head_sequence_logps

    k_rows, t, v, d, chunk = 2, 64, 500, 8, 8
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(k_rows, t, d, generator=g).to(torch.bfloat16).requires_grad_(True)
    weight = torch.randn(v, d, generator=g).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, v, (k_rows, t), generator=g)
    mask = torch.ones(k_rows, t, dtype=torch.bool)
    scored = k_rows * (t - 1)

    class Biggest(torch.utils._python_dispatch.TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    Biggest.largest = max(Biggest.largest, o.numel())
            return out

    with Biggest():
        sums, _ = head_sequence_logps(hidden, weight, ids, mask, chunk_size=chunk)
        sums.sum().backward()
    assert Biggest.largest <= max(chunk * v, weight.numel(), hidden.numel()) < scored * v
    # control: the same watcher sees K x V elements when the logits are formed whole
    Biggest.largest = 0
    with Biggest():
        (hidden @ weight.T).float().log_softmax(-1)
    assert Biggest.largest >= k_rows * t * v
    # and the result is the plain projection's
    ref, _ = reference((hidden @ weight.T).float(), ids, mask)
    torch.testing.assert_close(sums, ref, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("model_type,fused", [("llama", True), ("qwen3", True), ("mixtral", True),
                                              ("gemma2", False), ("cohere", False), ("granite", False)])
def test_fused_head_only_where_the_model_returns_lm_head_output_unchanged(model_type, fused):
    """Gemma-2 soft-caps, Cohere and Granite scale the logits after lm_head: scoring inside lm_head would skip
    that, so those models keep the full-logits path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_ds.scoring import fused_head

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=128, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = fused_head(model)
    assert (head is model.get_output_embeddings()) if fused else head is None


# ------------------------------------------------------------------ LD-DPO: sums split at the shorter completion
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_weighted_sums_are_shared_part_plus_alpha_times_the_tail(packed, alpha):
    """LD-DPO (TRL's ld_alpha): a completion's log-prob is the sum of its first L tokens' log-probs + alpha x the
    sum of the rest, L = min(chosen length, rejected length) of its pair; counts stay the completion lengths.
    Both scoring paths, right-padded and packed, against per-token log_softmax written out here."""
    from dpo_ds.logprobs import head_sequence_logps, ld_token_weights

    pairs = TokenizedPairs(prompt=[[1, 5, 6], [1, 7]], chosen=[[8, 9, 2], [10, 2]], rejected=[[11, 2], [12, 4, 5, 2]],
                           pair_ids=["a", "b"])
    batch = collate(pairs, [0, 1], pad_id=3, packed=packed)
    seqs = [(pairs.prompt[0], pairs.chosen[0]), (pairs.prompt[1], pairs.chosen[1]),
            (pairs.prompt[0], pairs.rejected[0]), (pairs.prompt[1], pairs.rejected[1])]
    shared = [2, 2, 2, 2]  # pair a: min(3, 2); pair b: min(2, 4)
    g = torch.Generator().manual_seed(8)
    table, weight = torch.randn(V, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
    hidden = table[batch["input_ids"]]
    logits = hidden @ weight.T
    weights = ld_token_weights(batch["loss_mask"], alpha, batch.get("sequence_ids"))
    scoring = (batch["sequence_ids"], 4) if packed else (None, None)
    from_logits, counts = sequence_logps(logits, batch["input_ids"], batch["loss_mask"], 2, *scoring, token_weights=weights)
    from_head, _ = head_sequence_logps(hidden, weight, batch["input_ids"], batch["loss_mask"], 2, *scoring,
                                       token_weights=weights)
    for s, (prompt, completion) in enumerate(seqs):
        row_ids = torch.tensor(list(prompt) + list(completion))
        row_logps = torch.log_softmax(table[row_ids] @ weight.T, -1)
        token = [row_logps[len(prompt) + j - 1, tok] for j, tok in enumerate(completion)]
        expected = sum(token[:shared[s]]) + alpha * sum(token[shared[s]:])
        torch.testing.assert_close(from_logits[s], expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(from_head[s], expected, rtol=1e-12, atol=1e-12)
    assert counts.tolist() == [3.0, 2.0, 2.0, 4.0]


# ------------------------------------------------------------------ WPO: per-sequence sums of log p - log sum p^2
@pytest.mark.parametrize("packed", [False, True])
def test_wpo_sums_match_full_softmax_in_both_scoring_paths(packed):
    """use_weighting's per-sequence sums of log p(y_t) - log sum_v p_v^2 (unweighted by LD-DPO's token weights,
    without gradient), from the logits path and from inside the output projection, against probabilities
    written out per token; the log-prob sums and their gradients are those of the scoring without WPO."""
    from dpo_ds.logprobs import ld_token_weights, score_hidden, score_logits, scoring_of

    pairs = TokenizedPairs(prompt=[[1, 5, 6], [1, 7]], chosen=[[8, 9, 2], [10, 2]], rejected=[[11, 2], [12, 4, 5, 2]],
                           pair_ids=["a", "b"])
    batch = collate(pairs, [0, 1], pad_id=3, packed=packed)
    seqs = [(pairs.prompt[0], pairs.chosen[0]), (pairs.prompt[1], pairs.chosen[1]),
            (pairs.prompt[0], pairs.rejected[0]), (pairs.prompt[1], pairs.rejected[1])]
    g = torch.Generator().manual_seed(9)
    table, weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 2, torch.randn(V, D, generator=g, dtype=torch.float64)
    hidden = table[batch["input_ids"]]
    layout = (batch["sequence_ids"], 4) if packed else (None, None)
    token_weights = ld_token_weights(batch["loss_mask"], 0.5, batch.get("sequence_ids"))
    expected = []
    for prompt, completion in seqs:
        row_ids = torch.tensor(list(prompt) + list(completion))
        probs = torch.softmax(table[row_ids] @ weight.T, -1)
        expected.append(sum(torch.log(probs[len(prompt) + j - 1, tok]) - torch.log((probs[len(prompt) + j - 1] ** 2).sum())
                            for j, tok in enumerate(completion)))
    plain = scoring_of(batch["input_ids"], batch["loss_mask"], *layout, token_weights)
    with_wpo = scoring_of(batch["input_ids"], batch["loss_mask"], *layout, token_weights, wpo=True)
    for score in (lambda h, s: score_logits(h @ weight.T, s, 2), lambda h, s: score_hidden(h, weight, s, 2)):
        h_plain, h_wpo = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
        want_sums, want_counts = score(h_plain, plain)
        sums, counts, wpo = score(h_wpo, with_wpo)
        torch.testing.assert_close(wpo, torch.stack(expected), rtol=1e-12, atol=1e-12)
        assert not wpo.requires_grad
        assert torch.equal(sums, want_sums) and torch.equal(counts, want_counts)
        sums.sum().backward()
        want_sums.sum().backward()
        assert torch.equal(h_wpo.grad, h_plain.grad)
