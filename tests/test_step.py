"""The DPO step (dpo_ds/step.py) on a tiny fp32 Llama behind a fake engine, single process, against a plain
per-sequence PyTorch computation over prompt+completion ids."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dpo_ds.config import TrainConfig
from dpo_ds.data import PairSampler, TokenizedPairs
from dpo_ds.metrics import PairStats
from dpo_ds.parallel import Parallel
from dpo_ds.reference import LiveReference, NoReference
from dpo_ds.scoring import scoring_head
from dpo_ds.sequence_parallel import BatchScorer
from dpo_ds.step import StepContext, evaluate_pairs, pair_step, split_pairs, train_step
from helpers import FakeEngine, tiny_causal_lm

BETA, PAD = 0.3, 0
# (prompt, chosen, rejected) lengths: differing lengths give padding in every padded micro-batch
SHAPES = [(3, 4, 2), (1, 5, 5), (5, 1, 3), (2, 2, 6), (4, 3, 1)]


@pytest.fixture(scope="module")
def pairs() -> TokenizedPairs:
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(1, 40, (n,), generator=g).tolist()
    rows = [(ids(p), ids(c), ids(r)) for p, c, r in SHAPES]
    return TokenizedPairs(fingerprint="fp", prompt=[r[0] for r in rows], chosen=[r[1] for r in rows],
                          rejected=[r[2] for r in rows], pair_ids=[f"row{i}" for i in range(len(rows))])


def plain_logp(model, prompt, completion) -> torch.Tensor:
    """Sum over completion tokens of log p(token | everything before it), one unpadded sequence."""
    ids = torch.tensor([list(prompt) + list(completion)])
    token_logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return token_logps[len(prompt) - 1:].sum()


def plain_pairs(policy, reference, pairs, indices):
    """(policy chosen, policy rejected, ref chosen, ref rejected, sigmoid losses) of `indices`, pair by pair."""
    def logps(model, column):
        if model is None:
            return torch.zeros(len(indices))
        return torch.stack([plain_logp(model, pairs.prompt[i], getattr(pairs, column)[i]) for i in indices])
    pc, pr = logps(policy, "chosen"), logps(policy, "rejected")
    with torch.no_grad():
        rc, rr = logps(reference, "chosen"), logps(reference, "rejected")
    losses = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr)))
    return pc, pr, rc, rr, losses


def sequences_of(inputs: dict[str, torch.Tensor]) -> list[list[int]]:
    """The unpadded token sequences of one forward's inputs, row by row (padded) or split at each position 0
    (packed)."""
    ids = inputs["input_ids"]
    if "attention_mask" in inputs:
        return [row[mask.bool()].tolist() for row, mask in zip(ids, inputs["attention_mask"])]
    starts = (inputs["position_ids"][0] == 0).nonzero()[:, 0].tolist() + [ids.shape[1]]
    return [ids[0, a:b].tolist() for a, b in zip(starts, starts[1:])]


def context(padding_free: bool, live_reference: bool, fused: bool = True, **fields):
    cfg = TrainConfig(beta=BETA, padding_free=padding_free, fused_lm_head=fused, logprob_chunk_size=3,
                      micro_batch_size=2, **fields)
    policy = FakeEngine(tiny_causal_lm(seed=1))
    reference_model = tiny_causal_lm(seed=2) if live_reference else None
    reference = (LiveReference(FakeEngine(reference_model), 3, scoring_head(reference_model, fused),
                               BatchScorer(Parallel(), PAD))
                 if live_reference else NoReference())
    return StepContext.create(cfg, Parallel(), policy, reference, PAD), reference_model


def test_split_pairs_rows_0_to_b_are_chosen():
    logps, tokens, ref = torch.arange(6.0), torch.arange(6) + 10, -torch.arange(6.0)
    lp = split_pairs(logps, tokens, ref)
    assert lp.policy_chosen.tolist() == [0, 1, 2] and lp.policy_rejected.tolist() == [3, 4, 5]
    assert lp.ref_chosen.tolist() == [0, -1, -2] and lp.ref_rejected.tolist() == [-3, -4, -5]
    assert lp.chosen_tokens.tolist() == [10, 11, 12] and lp.rejected_tokens.tolist() == [13, 14, 15]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
@pytest.mark.parametrize("live_reference,fused", [(False, True), (True, True), (True, False)],
                         ids=["no_reference", "live_reference", "live_reference_logits"])
def test_pair_step_matches_plain_dpo(pairs, padding_free, live_reference, fused):
    ctx, reference_model = context(padding_free, live_reference, fused)
    indices = [3, 0, 4]
    stats = PairStats(ctx.parallel)
    with torch.no_grad():
        lp, out = pair_step(ctx, pairs, indices, stats, train=False)
        pc, pr, rc, rr, losses = plain_pairs(ctx.policy.module, reference_model, pairs, indices)
    for got, want in [(lp.policy_chosen, pc), (lp.policy_rejected, pr), (lp.ref_chosen, rc), (lp.ref_rejected, rr),
                      (out.losses, losses)]:
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
    assert lp.chosen_tokens.tolist() == [SHAPES[i][1] for i in indices]
    assert lp.rejected_tokens.tolist() == [SHAPES[i][2] for i in indices]
    # one forward of the 2B sequences: prompt+chosen of each pair, then prompt+rejected
    (forward,) = ctx.policy.forwards
    assert sequences_of(forward) == ([pairs.prompt[i].tolist() + pairs.chosen[i].tolist() for i in indices]
                                     + [pairs.prompt[i].tolist() + pairs.rejected[i].tolist() for i in indices])
    assert stats.total("pairs") == 3 and stats.total("tokens_chosen") == sum(SHAPES[i][1] for i in indices)
    real = sum(2 * SHAPES[i][0] + SHAPES[i][1] + SHAPES[i][2] for i in indices)
    assert stats.total("real_tokens") == real
    longest = max(max(SHAPES[i][0] + SHAPES[i][1], SHAPES[i][0] + SHAPES[i][2]) for i in indices)
    assert stats.total("padded_tokens") == (real if padding_free else 2 * len(indices) * longest)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_evaluate_pairs_records_and_means(pairs, padding_free):
    ctx, reference_model = context(padding_free, live_reference=True)
    metrics, records = evaluate_pairs(ctx, pairs)
    everything = list(range(len(pairs)))
    with torch.no_grad():
        pc, pr, rc, rr, losses = plain_pairs(ctx.policy.module, reference_model, pairs, everything)
    assert [r["index"] for r in records] == everything
    assert [r["pair_id"] for r in records] == [f"row{i}" for i in everything]
    close = dict(rel=1e-4, abs=1e-5)
    for i, r in enumerate(records):
        assert (r["policy_chosen_logp"], r["policy_rejected_logp"], r["ref_chosen_logp"], r["ref_rejected_logp"],
                r["loss"]) == pytest.approx((pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(),
                                             losses[i].item()), **close)
        assert (r["chosen_tokens"], r["rejected_tokens"]) == SHAPES[i][1:]
    chosen_rewards, rejected_rewards = BETA * (pc - rc), BETA * (pr - rr)
    assert [r["correct"] for r in records] == (chosen_rewards > rejected_rewards).tolist()
    chosen_tokens, rejected_tokens = sum(s[1] for s in SHAPES), sum(s[2] for s in SHAPES)
    expected = {"loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
                "kl/chosen": (pc - rc).sum() / chosen_tokens, "kl/rejected": (pr - rr).sum() / rejected_tokens}
    assert metrics == pytest.approx({f"eval/{k}": float(v) for k, v in expected.items()}, **close)
    assert ctx.policy.steps == 0  # scoring only


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_train_step_visits_its_micro_batches_and_descends_the_plain_gradient(pairs, padding_free):
    ctx, _ = context(padding_free, live_reference=False)
    plain = copy.deepcopy(ctx.policy.module)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    start = [p.detach().clone() for p in plain.parameters()]
    sampler = PairSampler(pairs.lengths(), micro_batch_size=1, grad_accum=2, data_parallel_size=1, shuffle=True,
                          group_by_length=False, seed=5)
    expected = sampler.micro_batches(1, 0)
    result = train_step(ctx, sampler, pairs, step=1)
    assert result.micro_batches == expected and len(expected) == 2
    assert [sequences_of(f) for f in ctx.policy.forwards] == [
        [pairs.prompt[i].tolist() + pairs.chosen[i].tolist() for i in mb]
        + [pairs.prompt[i].tolist() + pairs.rejected[i].tolist() for i in mb] for mb in expected]
    assert ctx.policy.steps == 2 and result.stats.total("pairs") == 2 and result.stats.total("steps") == 1
    for mb in expected:  # the fake engine steps after every micro-batch: so does the plain loop
        plain_opt.zero_grad()
        plain_pairs(plain, None, pairs, mb)[-1].mean().backward()
        plain_opt.step()
    for (name, got), want in zip(ctx.policy.module.named_parameters(), plain.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(got, first) for got, first in zip(plain.parameters(), start))  # it did train


def test_pair_step_loss_scale_weights_the_summed_losses(pairs):
    ctx, _ = context(padding_free=False, live_reference=False)
    plain = copy.deepcopy(ctx.policy.module)
    pair_step(ctx, pairs, [1, 2], None, train=True, loss_scale=0.7)
    (plain_pairs(plain, None, pairs, [1, 2])[-1].sum() * 0.7).backward()
    with torch.no_grad():
        for (name, got), want in zip(ctx.policy.module.named_parameters(), plain.parameters()):
            torch.testing.assert_close(got, want - 0.05 * want.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ctx.policy.steps == 1
