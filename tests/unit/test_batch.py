"""Collation into the sequence and response frames, and row selection."""

import pytest
import torch

from actors.types import Rollout
from learner.batch import (TrainBatch, arrange_by_length, collate, micro_batch_sizes, minibatch_plan,
                           response_positions, split_evenly)


def rollout(prompt, response, logprobs):
    return Rollout(prompt_index=0, slot=0, sample_index=0, prompt_text="", answer=None, prompt_token_ids=tuple(prompt),
                   response_token_ids=tuple(response), response_logprobs=tuple(logprobs), response_text="",
                   finish_reason="stop", policy_version=0)


def test_collate_frames_and_positions():
    rs = [rollout([5, 6, 7], [8, 9], [-0.1, -0.2]), rollout([5], [4, 3, 2, 1], [-1.0, -2.0, -3.0, -4.0])]
    b = collate(rs, pad_token_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 1]]
    assert b.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert torch.allclose(b.rollout_logprobs[0], torch.tensor([-0.1, -0.2, 0.0, 0.0]))
    pos = response_positions(b)
    # The logit at position p predicts token p + 1: response token t of row 0 sits at 3 + t.
    assert pos[0, :2].tolist() == [2, 3]
    assert pos[1].tolist() == [0, 1, 2, 3]
    labels = b.input_ids.gather(1, pos + 1)
    assert labels[0, :2].tolist() == [8, 9] and labels[1].tolist() == [4, 3, 2, 1]


def test_select_trims_both_frames():
    # Row 1 is the longer in both frames (7 tokens, 4 of response): selecting row 0 alone must
    # cut the sequence frame from 7 to 5 and the response frame from 4 to 2.
    rs = [rollout([5, 6, 7], [8, 9], [-0.1, -0.2]), rollout([5, 5, 5], [4, 3, 2, 1], [-1.0, -2.0, -3.0, -4.0])]
    full = collate(rs, pad_token_id=0)
    b = full.select([0])
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9]] and b.attention_mask.tolist() == [[1, 1, 1, 1, 1]]
    assert b.prompt_lengths.tolist() == [3] and b.response_mask.tolist() == [[1, 1]]
    torch.testing.assert_close(b.rollout_logprobs, torch.tensor([[-0.1, -0.2]]))
    # A TrainBatch cuts its response-frame tensors to the same width, rows in the order asked.
    adv = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 5.0, 6.0]])
    train = TrainBatch(rollouts=full, old_logprobs=-adv, advantages=adv, returns=None, old_values=None,
                       ref_logprobs=adv * 10, importance_weights=None)
    picked = train.select([1, 0])
    assert picked.rollouts.input_ids.shape == (2, 7) and picked.advantages.tolist() == [[3, 4, 5, 6], [1, 2, 0, 0]]
    assert picked.old_logprobs.tolist() == [[-3, -4, -5, -6], [-1, -2, 0, 0]]
    assert picked.ref_logprobs.tolist() == [[30, 40, 50, 60], [10, 20, 0, 0]] and picked.returns is None
    assert train.select([0]).advantages.tolist() == [[1, 2]]


def _padded_positions(lengths, rows, num_micro):
    """Positions a rank computes for ``rows`` cut like ``micro_batches``, each padded to its longest row."""
    return sum((hi - lo) * max(lengths[r] for r in rows[lo:hi]) for lo, hi in split_evenly(len(rows), num_micro)
               if hi > lo)


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_arrange_by_length_deals_every_row_once_sorted_and_balanced(ranks):
    g = torch.Generator().manual_seed(ranks)
    lengths = (torch.randint(20, 400, (37,), generator=g)).tolist()
    shards = arrange_by_length(lengths, ranks)
    assert sorted(r for shard in shards for r in shard) == list(range(37))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for shard in shards:
        assert [lengths[r] for r in shard] == sorted((lengths[r] for r in shard), reverse=True)
    tokens = [sum(lengths[r] for r in s) for s in shards]
    contiguous = [sum(lengths[lo:hi]) for lo, hi in split_evenly(37, ranks)]
    assert max(tokens) - min(tokens) <= max(contiguous) - min(contiguous)
    assert max(tokens) - min(tokens) <= max(lengths)  # the snake keeps ranks within one row of each other


def test_arranged_micro_batches_compute_less_padding():
    """Ragged lengths (GSM8K-like prompts + responses), 64 rows over 2 ranks, 4 micro-batches each."""
    g = torch.Generator().manual_seed(0)
    lengths = (torch.randint(60, 200, (64,), generator=g) + torch.randint(20, 512, (64,), generator=g)).tolist()
    contiguous = sum(_padded_positions(lengths, list(range(lo, hi)), 4) for lo, hi in split_evenly(64, 2))
    arranged = sum(_padded_positions(lengths, shard, 4) for shard in arrange_by_length(lengths, 2))
    real = sum(lengths)
    print(f"padding: contiguous {1 - real / contiguous:.2f}, arranged {1 - real / arranged:.2f}")
    assert arranged < contiguous
    assert 1 - real / arranged < 0.5 * (1 - real / contiguous)


def test_arrange_by_length_needs_a_rank():
    with pytest.raises(ValueError, match="ranks"):
        arrange_by_length([3, 2], 0)


def test_micro_batch_sizes_by_rows_spread_rows_evenly_with_empty_passes_when_short():
    lengths = [10] * 7
    shards = arrange_by_length(lengths, 2)  # 3 and 4 rows (the snake: 0, 1, 1, 0, 0, 1, 1)
    assert micro_batch_sizes(lengths, shards, rows_per_micro=2) == [[2, 1], [2, 2]]
    assert micro_batch_sizes(lengths, arrange_by_length(lengths[:1], 2), rows_per_micro=2) == [[1], [0]]


def test_micro_batch_sizes_by_tokens_fill_a_budget_and_match_across_ranks():
    g = torch.Generator().manual_seed(3)
    # Mostly short rows, some long ones, and one over the budget.
    lengths = (torch.randint(30, 60, (40,), generator=g).tolist() + torch.randint(300, 500, (10,), generator=g).tolist()
               + [900])
    shards = arrange_by_length(lengths, 3)
    budget = 800
    sizes = micro_batch_sizes(lengths, shards, rows_per_micro=4, token_budget=budget)
    assert len({len(s) for s in sizes}) == 1  # the same number of passes on every rank
    for shard, rank_sizes in zip(shards, sizes):
        assert sum(rank_sizes) == len(shard)
        lo = 0
        for size in rank_sizes:
            rows = shard[lo:lo + size]
            lo += size
            if size > 1:
                assert size * max(lengths[r] for r in rows) <= budget
    # Short rows run many to a pass, long ones few: more rows per pass than the row mode's 4.
    assert max(max(s) for s in sizes) > 4
    assert sizes[0][0] == 1  # the 900-token row runs alone


def test_packed_micro_batches_fill_a_budget_with_real_tokens():
    lengths = [500, 300, 250, 200, 120, 100, 90, 40]
    (sizes,) = micro_batch_sizes(lengths, [list(range(8))], rows_per_micro=1, token_budget=600, packed=True)
    assert sizes == [1, 2, 5]  # 500 | 300 + 250 | 200 + 120 + 100 + 90 + 40 = 550
    # Padded, the same budget holds fewer rows: a pass costs rows x its longest row.
    assert micro_batch_sizes(lengths, [list(range(8))], 1, 600) == [[1, 2, 3, 2]]


def test_micro_batch_sizes_split_the_largest_passes_of_a_rank_that_needs_fewer():
    lengths = [400, 400, 100, 100, 100, 100]
    shards = [[0, 1], [2, 3, 4, 5]]  # rank 0 needs 2 passes of 400, rank 1 fits one pass of 4 x 100
    assert micro_batch_sizes(lengths, shards, rows_per_micro=1, token_budget=400) == [[1, 1], [2, 2]]
    assert micro_batch_sizes([400, 400, 400, 100], [[0, 1, 2], [3]], 1, 400) == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("size, world, minibatches, epochs", [(16, 2, 4, 2), (5, 2, 4, 1), (3, 4, 2, 1), (12, 1, 1, 3)])
def test_minibatch_plan_covers_each_row_once_per_epoch_and_gives_every_rank_a_row(size, world, minibatches, epochs):
    plan = minibatch_plan(size, world, minibatches, epochs, seed=3)
    parts = max(1, min(minibatches, size // world))  # fewer parts when the batch is short
    assert len(plan) == parts * epochs
    for e in range(epochs):
        epoch = torch.cat(plan[e * parts:(e + 1) * parts])
        assert sorted(epoch.tolist()) == list(range(size))
    if size >= world:
        assert min(len(p) for p in plan) >= world
    assert all(torch.equal(a, b) for a, b in zip(plan, minibatch_plan(size, world, minibatches, epochs, seed=3)))
    # The seed decides the order (the controller seeds it with the run seed and the step).
    others = [minibatch_plan(size, world, minibatches, epochs, seed=s) for s in range(4, 10)]
    assert any(not torch.equal(a, b) for other in others for a, b in zip(plan, other))
