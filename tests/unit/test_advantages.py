"""Advantage estimators against naive Python-loop references and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from learner.advantages import (
    discounted_returns,
    filter_uniform_groups,
    gae,
    grpo_advantages,
    group_mean_baseline,
    masked_mean,
    masked_whiten,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    token_level_rewards,
)

LENGTHS = [5, 1, 3, 7, 2, 4]  # ragged rows, T = 7
# Uneven groups with non-contiguous, unsorted ids: 42 has 3 members, 7 has 2, 100 has 1.
GROUPS = [42, 7, 42, 100, 7, 42]


def ragged_mask(lengths: list[int], dtype=torch.float32) -> torch.Tensor:
    t = max(lengths)
    return torch.tensor([[1] * n + [0] * (t - n) for n in lengths], dtype=dtype)


def with_garbage(x: torch.Tensor, mask: torch.Tensor, value: float = 1e4) -> torch.Tensor:
    """Fill padding with a large value: any leak into a real token shows."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# ---------- naive references (loops over rows and tokens) ----------


def ref_gae_row(rewards, values, gamma, lam):
    n = len(rewards)
    adv = [0.0] * n
    for t in range(n):
        total = 0.0
        for k in range(t, n):
            next_v = values[k + 1] if k + 1 < n else 0.0
            delta = rewards[k] + gamma * next_v - values[k]
            total += (gamma * lam) ** (k - t) * delta
        adv[t] = total
    return adv, [a + v for a, v in zip(adv, values)]


def ref_returns_row(rewards, gamma):
    n = len(rewards)
    return [sum(gamma ** (k - t) * rewards[k] for k in range(t, n)) for t in range(n)]


def ref_group_members(groups):
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return members


def ref_whiten(rows, shift_mean=True, eps=1e-8):
    flat = [x for row in rows for x in row]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / len(flat)
    shift = mean if shift_mean else 0.0
    return [[(x - shift) / math.sqrt(var + eps) for x in row] for row in rows]


def to_padded(rows, t):
    return torch.tensor([row + [0.0] * (t - len(row)) for row in rows], dtype=torch.float64)


# ---------- masked_mean / masked_whiten ----------


def test_masked_mean_matches_loop_and_ignores_padding():
    torch.manual_seed(0)
    mask = ragged_mask(LENGTHS)
    x = with_garbage(torch.randn(mask.shape, dtype=torch.float64), mask, float("nan"))
    rows = [x[i, :n].tolist() for i, n in enumerate(LENGTHS)]
    flat = [v for row in rows for v in row]
    assert masked_mean(x, mask).item() == pytest.approx(sum(flat) / len(flat))
    per_row = masked_mean(x, mask, dim=1)
    assert per_row.tolist() == pytest.approx([sum(r) / len(r) for r in rows])


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(shift_mean):
    torch.manual_seed(1)
    mask = ragged_mask(LENGTHS)
    x = with_garbage(3.0 + 2.0 * torch.randn(mask.shape, dtype=torch.float64), mask)
    rows = [x[i, :n].tolist() for i, n in enumerate(LENGTHS)]
    expected = to_padded(ref_whiten(rows, shift_mean), x.shape[1])
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(out, expected)
    assert (out[mask == 0] == 0).all()


def test_masked_whiten_single_token_is_zero_not_nan():
    out = masked_whiten(torch.tensor([[3.5, 9.0]]), torch.tensor([[1.0, 0.0]]))
    assert out.tolist() == [[0.0, 0.0]]


# ---------- GAE / discounted returns ----------


def test_gae_hand_computed_three_tokens():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72); rewards [0, 0, 1], values [0.5, 0.6, 0.7]
    # delta_2 = 1 + 0.9 * 0   - 0.7 = 0.3      (value after the last token is 0)
    # delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03
    # delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04
    # A_2 = 0.3
    # A_1 = 0.03 + 0.72 * 0.3   = 0.246
    # A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    # Second row: length 2 with garbage at its padding position (reward 5, value 100), which
    # must not leak: delta_1 = 1 - 0.2 = 0.8, delta_0 = 0.9 * 0.2 - 0.1 = 0.08,
    # A_0 = 0.08 + 0.72 * 0.8 = 0.656.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7], [0.1, 0.2, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3], [0.656, 0.8, 0.0]], **f64))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0], [0.756, 1.0, 0.0]], **f64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_loop_reference_on_ragged_batch(gamma, lam):
    torch.manual_seed(2)
    mask = ragged_mask(LENGTHS)
    rewards = with_garbage(torch.randn(mask.shape, dtype=torch.float64), mask)
    values = with_garbage(torch.randn(mask.shape, dtype=torch.float64), mask)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    exp_adv, exp_ret = [], []
    for i, n in enumerate(LENGTHS):
        a, r = ref_gae_row(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        exp_adv.append(a)
        exp_ret.append(r)
    torch.testing.assert_close(adv, to_padded(exp_adv, mask.shape[1]))
    torch.testing.assert_close(ret, to_padded(exp_ret, mask.shape[1]))


def test_gae_does_not_carry_gradient_into_values():
    values = torch.tensor([[0.5, 0.6]], requires_grad=True)
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_with_gamma_lam_one_is_monte_carlo_return_minus_value():
    torch.manual_seed(3)
    mask = ragged_mask(LENGTHS)
    rewards = torch.randn(mask.shape, dtype=torch.float64)
    values = torch.randn(mask.shape, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    mc = discounted_returns(rewards, mask, 1.0)
    torch.testing.assert_close(ret, mc)
    torch.testing.assert_close(adv, (mc - values) * mask)


def test_discounted_returns_hand_computed():
    # gamma = 0.5, rewards [1, 2, 3]: G_2 = 3, G_1 = 2 + 0.5 * 3 = 3.5, G_0 = 1 + 0.5 * 3.5 = 2.75
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    out = discounted_returns(rewards, torch.tensor([[1, 1, 1], [1, 0, 0]]), 0.5)
    assert out.tolist() == [[2.75, 3.5, 3.0], [4.0, 0.0, 0.0]]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_matches_loop(gamma):
    torch.manual_seed(4)
    mask = ragged_mask(LENGTHS)
    rewards = with_garbage(torch.randn(mask.shape, dtype=torch.float64), mask)
    expected = [ref_returns_row(rewards[i, :n].tolist(), gamma) for i, n in enumerate(LENGTHS)]
    out = discounted_returns(rewards, mask, gamma)
    torch.testing.assert_close(out, to_padded(expected, mask.shape[1]))


# ---------- group estimators ----------


def ref_grpo(scores, groups, eps, scale_by_std):
    members = ref_group_members(groups)
    out = []
    for i, g in enumerate(groups):
        vals = [scores[j] for j in members[g]]
        if len(set(vals)) == 1:
            out.append(0.0)
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        out.append((scores[i] - mean) / (std + eps) if scale_by_std else scores[i] - mean)
    return out


def per_token(per_seq, lengths):
    t = max(lengths)
    return to_padded([[a] * n for a, n in zip(per_seq, lengths)], t)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_loop_reference(scale_by_std):
    torch.manual_seed(5)
    mask = ragged_mask(LENGTHS)
    scores = torch.randn(len(LENGTHS), dtype=torch.float64)
    out = grpo_advantages(scores, torch.tensor(GROUPS), mask, eps=1e-6, scale_by_std=scale_by_std)
    expected = per_token(ref_grpo(scores.tolist(), GROUPS, 1e-6, scale_by_std), LENGTHS)
    torch.testing.assert_close(out, expected)
    assert out[3].abs().sum() == 0  # the size-1 group (id 100)


def test_grpo_hand_computed_binary_group():
    # Group of 4 with scores [1, 0, 0, 1]: mean 0.5, unbiased std = sqrt(4 * 0.25 / 3) = 0.57735,
    # advantages +-0.5 / 0.57735 = +-0.866025. Dr. GRPO (no std) gives +-0.5.
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]])
    out = grpo_advantages(scores, torch.zeros(4, dtype=torch.long), mask)
    s = 0.5 / math.sqrt(1 / 3)
    expected = torch.tensor([[s, s], [-s, 0.0], [-s, -s], [s, 0.0]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    dr = grpo_advantages(scores, torch.zeros(4, dtype=torch.long), mask, scale_by_std=False)
    assert dr.tolist() == [[0.5, 0.5], [-0.5, 0.0], [-0.5, -0.5], [0.5, 0.0]]


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_uniform_and_singleton_groups_give_exact_zero(scale_by_std):
    # In float32 (0.9 + 0.9 + 0.9) / 3 != 0.9: the rounding error over a std of the same
    # size (+ eps) would be a visible advantage if uniform groups were not zeroed explicitly.
    scores = torch.tensor([0.9, 0.9, 0.9, 0.7, 1.0, 0.0])
    groups = torch.tensor([3, 3, 3, 8, 5, 5])
    out = grpo_advantages(scores, groups, torch.ones(6, 4), scale_by_std=scale_by_std)
    assert torch.isfinite(out).all()
    assert (out[:4] == 0).all()
    assert (out[4] > 0).all() and (out[5] < 0).all()


def test_rloo_hand_computed_and_matches_loop():
    # Scores [1, 2, 3, 6] in one group: baselines are the mean of the other three:
    # 11/3, 10/3, 9/3, 6/3 -> advantages [-8/3, -4/3, 0, 4]. The singleton gets 0.
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0], dtype=torch.float64)
    groups = torch.tensor([1, 1, 1, 1, 9])
    out = rloo_advantages(scores, groups, torch.ones(5, 1))
    expected = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(out[:, 0], expected)

    torch.manual_seed(6)
    mask = ragged_mask(LENGTHS)
    scores = torch.randn(len(LENGTHS), dtype=torch.float64)
    members = ref_group_members(GROUPS)
    expected = []
    for i, g in enumerate(GROUPS):
        others = [scores[j].item() for j in members[g] if j != i]
        expected.append(scores[i].item() - sum(others) / len(others) if others else 0.0)
    out = rloo_advantages(scores, torch.tensor(GROUPS), mask)
    torch.testing.assert_close(out, per_token(expected, LENGTHS))


def test_group_mean_baseline_matches_loop():
    torch.manual_seed(7)
    scores = torch.randn(len(GROUPS), dtype=torch.float64)
    members = ref_group_members(GROUPS)
    expected = []
    for i, g in enumerate(GROUPS):
        group = [scores[j].item() for j in members[g]]
        expected.append(scores[i].item() - sum(group) / len(group))
    out = group_mean_baseline(scores, torch.tensor(GROUPS))
    assert out.shape == (len(GROUPS),)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    assert out[3] == 0  # singleton


def test_reinforce_pp_matches_loop_reference():
    torch.manual_seed(8)
    mask = ragged_mask(LENGTHS)
    rewards = with_garbage(torch.randn(mask.shape, dtype=torch.float64), mask)
    gamma = 0.95
    returns = [ref_returns_row(rewards[i, :n].tolist(), gamma) for i, n in enumerate(LENGTHS)]
    expected = to_padded(ref_whiten(returns), mask.shape[1])
    out = reinforce_pp_advantages(rewards, mask, gamma=gamma)
    torch.testing.assert_close(out, expected)
    # Whitened over the whole batch: zero mean and unit variance over real tokens.
    real = out[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert real.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_reinforce_pp_baseline_pipeline_sequence_rewards():
    # The controller's REINFORCE++-baseline path: subtract the group mean, put the score on
    # the last token, then whiten. With gamma = 1 every token of a row gets the same return.
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    mask = ragged_mask([2, 3, 1, 2])
    rewards = token_level_rewards(group_mean_baseline(scores, groups), mask)
    out = reinforce_pp_advantages(rewards, mask)
    # Real returns: row0 [.5,.5], row1 [-.5,-.5,-.5], rows 2,3 zero; mean -0.5/8 = -0.0625,
    # population std sqrt(1.21875 / 8) = 0.390312; whitened: (r + 0.0625) / 0.390312.
    # Skipping either step changes every value: without the baseline the returns are 1, 0, 1, 1
    # per row; without whitening they stay 0.5, -0.5, 0, 0.
    std = math.sqrt(1.21875 / 8)
    expected = torch.zeros(mask.shape, dtype=out.dtype)
    expected[0, :2] = 0.5625 / std  # 1.4411
    expected[1, :3] = -0.4375 / std  # -1.1209
    expected[2, :1] = expected[3, :2] = 0.0625 / std  # 0.1601
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# ---------- reward shaping ----------


def test_token_level_rewards_places_score_on_last_real_token():
    scores = torch.tensor([1.0, -2.0, 0.5])
    mask = ragged_mask([3, 1, 4])
    out = token_level_rewards(scores, mask)
    assert out.tolist() == [[0, 0, 1.0, 0], [-2.0, 0, 0, 0], [0, 0, 0, 0.5]]


def test_token_level_rewards_subtracts_kl_penalty_on_real_tokens_only():
    torch.manual_seed(9)
    scores = torch.randn(len(LENGTHS))
    mask = ragged_mask(LENGTHS)
    kl = torch.rand(mask.shape)
    out = token_level_rewards(scores, mask, kl_penalty=kl)
    for i, n in enumerate(LENGTHS):
        for t in range(mask.shape[1]):
            score = scores[i].item() if t == n - 1 else 0.0
            expected = 0.0 if t >= n else score - kl[i, t].item()
            assert out[i, t].item() == pytest.approx(expected, abs=1e-6)


def test_filter_uniform_groups():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.3, 0.5])
    # Group 4: [1, 1, 0.5] mixed; 2: [0, 1] mixed; 6: [0, 0] uniform; 9: singleton.
    groups = torch.tensor([4, 4, 2, 2, 6, 6, 9, 4])
    keep = filter_uniform_groups(scores, groups)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [True, True, True, True, False, False, False, True]


def test_overlong_penalty_hand_values():
    # max 20, buffer 4: free up to 16, then -(len - 16) / 4 down to -1 at 20, -1 beyond.
    lengths = torch.tensor([10, 16, 17, 18, 20, 25])
    assert overlong_penalty(lengths, 20, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    half = overlong_penalty(lengths, 20, 4, penalty=0.5)
    assert half.tolist() == [0.0, 0.0, -0.125, -0.25, -0.5, -0.5]


@pytest.mark.parametrize("buffer", [0, 21])
def test_overlong_penalty_rejects_bad_buffer(buffer):
    with pytest.raises(ValueError, match="buffer_tokens"):
        overlong_penalty(torch.tensor([5]), 20, buffer)
