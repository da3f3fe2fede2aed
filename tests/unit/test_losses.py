"""The policy and value losses and their aggregation against loop references, hand values and
invariances (the KL estimators and the other helpers: test_loss_helpers.py)."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import LOSS_AGG_MODES, aggregate, policy_loss, value_loss

LENGTHS = [5, 1, 3, 7, 2, 4]


def ragged_mask(lengths: list[int], dtype=torch.float32) -> torch.Tensor:
    t = max(lengths)
    return torch.tensor([[1] * n + [0] * (t - n) for n in lengths], dtype=dtype)


def ref_aggregate(rows: list[list[float]], mode: str, num_tokens=None, num_seqs=None) -> float:
    """rows: the real-token losses of each row."""
    if mode == "token_mean":
        denom = num_tokens if num_tokens is not None else sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / denom
    denom = num_seqs if num_seqs is not None else len(rows)
    if mode == "seq_mean_token_sum":
        return sum(sum(r) for r in rows) / denom
    return sum(sum(r) / len(r) for r in rows) / denom


def ref_pg_token(lp, old, adv, clip_low, clip_high, dual_clip=None, weight=1.0):
    """-> (loss, clipped branch active, dual cap active)"""
    ratio = math.exp(lp - old)
    unclipped = -adv * ratio
    clipped = -adv * min(max(ratio, 1 - clip_low), 1 + clip_high)
    loss = max(unclipped, clipped)
    capped = False
    if dual_clip is not None and adv < 0 and -adv * dual_clip < loss:
        loss, capped = -adv * dual_clip, True
    return loss * weight, clipped > unclipped, capped


def random_batch(seed: int, dtype=torch.float64):
    torch.manual_seed(seed)
    mask = ragged_mask(LENGTHS)
    old = -torch.rand(mask.shape, dtype=dtype) * 3
    logprobs = old + 0.4 * torch.randn(mask.shape, dtype=dtype)  # ratios well outside [0.8, 1.2]
    # Garbage on padding: the loss must not see it (exp(1e4) would be inf).
    logprobs = torch.where(mask.bool(), logprobs, torch.full_like(logprobs, 1e4))
    adv = torch.randn(mask.shape, dtype=dtype) * mask
    return logprobs, old, adv, mask


def plant_dual_clipped_tokens(logprobs, old, adv):
    """Two real tokens with ratio e^2.5 ~ 12 and a negative advantage, so a dual clip of 3 caps
    them (random ratios above stay below 2 and would never reach it)."""
    for i, t in ((0, 0), (3, 5)):
        logprobs[i, t], adv[i, t] = old[i, t] + 2.5, -1.0


# ---------- aggregate ----------


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_matches_loop(mode):
    torch.manual_seed(0)
    mask = ragged_mask(LENGTHS)
    loss = torch.where(mask.bool(), torch.randn(mask.shape, dtype=torch.float64), float("nan"))
    rows = [loss[i, :n].tolist() for i, n in enumerate(LENGTHS)]
    assert aggregate(loss, mask, mode).item() == pytest.approx(ref_aggregate(rows, mode))
    got = aggregate(loss, mask, mode, num_tokens=50.0, num_seqs=13.0).item()
    assert got == pytest.approx(ref_aggregate(rows, mode, num_tokens=50.0, num_seqs=13.0))


def test_aggregate_unknown_mode_names_mode_and_choices():
    allowed = "token_mean, seq_mean_token_sum, seq_mean_token_mean"
    with pytest.raises(ValueError, match=f"'seq_sum'.*{allowed}"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "seq_sum")


# ---------- policy loss ----------


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("clip_low,clip_high,dual_clip", [(0.2, 0.2, None), (0.2, 0.28, 3.0)])
def test_policy_loss_matches_loop_reference(mode, clip_low, clip_high, dual_clip):
    logprobs, old, adv, mask = random_batch(1)
    plant_dual_clipped_tokens(logprobs, old, adv)
    weights = torch.rand(mask.shape, dtype=torch.float64) + 0.5
    loss, metrics = policy_loss(
        logprobs, old, adv, mask.bool(), clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, loss_agg=mode, importance_weights=weights,
    )
    rows, clipped, capped, kls, ratios = [], [], [], [], []
    for i, n in enumerate(LENGTHS):
        row = []
        for t in range(n):
            args = (logprobs[i, t].item(), old[i, t].item(), adv[i, t].item(), clip_low, clip_high)
            loss_t, clip_t, cap_t = ref_pg_token(*args, dual_clip, weights[i, t].item())
            row.append(loss_t)
            clipped.append(clip_t)
            capped.append(cap_t)
            r = math.exp(args[0] - args[1])
            ratios.append(r)
            kls.append(r - 1 - math.log(r))
        rows.append(row)
    assert loss.item() == pytest.approx(ref_aggregate(rows, mode))
    assert metrics["pg_loss"] == pytest.approx(loss.item())
    assert metrics["clipfrac"] == pytest.approx(sum(clipped) / len(clipped))
    assert 0 < metrics["clipfrac"] < 1  # the batch exercises both branches
    assert metrics["approx_kl"] == pytest.approx(sum(kls) / len(kls))
    assert metrics["ratio_mean"] == pytest.approx(sum(ratios) / len(ratios))
    assert metrics["ratio_max"] == pytest.approx(max(ratios))
    assert metrics["ratio_min"] == pytest.approx(min(ratios))
    if dual_clip is None:
        assert "dual_clipfrac" not in metrics
    else:
        assert metrics["dual_clipfrac"] == pytest.approx(sum(capped) / len(capped))
        assert metrics["dual_clipfrac"] == pytest.approx(2 / sum(LENGTHS))  # the planted tokens


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    torch.manual_seed(2)
    mask = ragged_mask(LENGTHS).bool()
    old = -torch.rand(mask.shape, dtype=torch.float64)
    logprobs = old.clone().requires_grad_(True)
    adv = torch.randn(mask.shape, dtype=torch.float64)
    loss, metrics = policy_loss(logprobs, old, adv, mask)
    n = mask.sum().item()
    assert loss.item() == pytest.approx(-adv[mask].sum().item() / n)
    assert metrics["clipfrac"] == 0.0
    assert metrics["approx_kl"] == 0.0
    assert metrics["ratio_mean"] == metrics["ratio_max"] == metrics["ratio_min"] == 1.0
    loss.backward()
    # Vanilla policy gradient at the behaviour policy: d loss / d logprob = -A / N.
    torch.testing.assert_close(logprobs.grad, torch.where(mask, -adv / n, 0))


def _pg_grad(ratios, advs, **kwargs):
    logprobs = torch.log(torch.tensor([ratios], dtype=torch.float64)).requires_grad_(True)
    old = torch.zeros_like(logprobs)
    adv = torch.tensor([advs], dtype=torch.float64)
    loss, metrics = policy_loss(logprobs, old, adv, torch.ones_like(adv), **kwargs)
    loss.backward()
    return loss.item(), logprobs.grad[0].tolist(), metrics


def test_policy_loss_clipped_tokens_get_exactly_zero_gradient():
    # token: A>0 r>1+eps (clipped) | A<0 r<1-eps (clipped) | A>0 r<1-eps | A<0 r>1+eps | inside
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1]
    advs = [1.0, -1.0, 1.0, -1.0, 2.0]
    loss, grad, metrics = _pg_grad(ratios, advs)
    assert grad[0] == 0.0 and grad[1] == 0.0
    # Unclipped tokens (PPO is pessimistic: clipping never helps the objective) keep
    # the gradient -A * ratio / N.
    assert grad[2:] == pytest.approx([-0.5 / 5, 1.5 / 5, -2.2 / 5])
    assert metrics["clipfrac"] == pytest.approx(2 / 5)
    assert loss == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5 - 2.2) / 5)


def test_policy_loss_clip_higher_is_asymmetric():
    ratios, advs = [1.25, 0.75], [1.0, -1.0]
    # Symmetric 0.2: both tokens are clipped.
    _, grad, metrics = _pg_grad(ratios, advs, clip_low=0.2, clip_high=0.2)
    assert grad == [0.0, 0.0] and metrics["clipfrac"] == 1.0
    # clip_high 0.28 lets the positive-advantage token at 1.25 keep learning; the low
    # bound still clips the negative one at 0.75.
    _, grad, metrics = _pg_grad(ratios, advs, clip_low=0.2, clip_high=0.28)
    assert grad == pytest.approx([-1.25 / 2, 0.0]) and metrics["clipfrac"] == 0.5
    # clip_low 0.3 frees the negative one instead.
    _, grad, _ = _pg_grad(ratios, advs, clip_low=0.3, clip_high=0.2)
    assert grad == pytest.approx([0.0, 0.75 / 2])
    # The clipped value sits at the higher bound: -A * (1 + clip_high).
    loss, _, _ = _pg_grad([1.4], [1.0], clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.28)


def test_policy_loss_dual_clip_caps_negative_advantage_loss():
    ratios, advs = [10.0, 2.0, 10.0], [-1.0, -1.0, 1.0]
    loss_plain, grad_plain, _ = _pg_grad(ratios, advs)
    assert loss_plain == pytest.approx((10.0 + 2.0 - 1.2) / 3)
    loss, grad, metrics = _pg_grad(ratios, advs, dual_clip=3.0)
    # Token 0: loss 10 capped at |A| * 3 = 3, gradient gone; token 1 (2 < 3) untouched;
    # positive advantages are never dual-clipped.
    assert loss == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    assert grad[0] == 0.0 and grad_plain[0] == pytest.approx(10.0 / 3)
    assert grad[1] == pytest.approx(2.0 / 3)
    assert metrics["dual_clipfrac"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("bad", [1.0, 0.5])
def test_policy_loss_rejects_dual_clip_not_above_one(bad):
    with pytest.raises(ValueError, match="dual_clip"):
        _pg_grad([1.0], [1.0], dual_clip=bad)


def test_policy_loss_importance_weights_scale_loss_and_are_not_differentiated():
    logprobs = torch.log(torch.tensor([[1.1, 0.9]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    weights = torch.tensor([[0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros_like(adv)
    loss, _ = policy_loss(logprobs, old, adv, torch.ones(1, 2), importance_weights=weights)
    assert loss.item() == pytest.approx((0.5 * -1.1 + 2.0 * 1.8) / 2)
    loss.backward()
    assert weights.grad is None
    assert logprobs.grad[0].tolist() == pytest.approx([0.5 * -1.1 / 2, 2.0 * 1.8 / 2])


def test_policy_loss_padding_garbage_gives_finite_loss_and_gradients():
    logprobs, old, adv, mask = random_batch(3)
    logprobs.requires_grad_(True)
    loss, metrics = policy_loss(logprobs, old, adv, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[mask == 0] == 0).all()
    assert math.isfinite(metrics["ratio_max"])


def test_policy_loss_a_diverged_token_stays_finite():
    # log-ratio 100 with a negative advantage: exp(100) overflows float32 to inf, and the
    # unclipped branch (-A * ratio) is the maximum, so one such token made the loss inf.
    logprobs = torch.tensor([[100.0, 0.0]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 2), -torch.ones(1, 2), torch.ones(1, 2)
    loss, _ = policy_loss(logprobs, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx((math.exp(20) + 1) / 2)  # the ratio is capped at e^20
    assert torch.isfinite(logprobs.grad).all()


# ---------- micro-batch / data-parallel invariance ----------

SPLITS = [(0, 1), (1, 4), (4, 6)]  # uneven micro-batches, one of a single row


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_policy_loss_is_invariant_to_micro_batch_split(mode):
    logprobs, old, adv, mask = random_batch(4)
    plant_dual_clipped_tokens(logprobs, old, adv)  # in the first and second micro-batches
    weights = torch.rand(mask.shape, dtype=torch.float64) + 0.5
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, loss_agg=mode)

    full_lp = logprobs.clone().requires_grad_(True)
    full, metrics = policy_loss(full_lp, old, adv, mask, importance_weights=weights, **kwargs)
    full.backward()
    assert metrics["dual_clipfrac"] > 0 and 0 < metrics["clipfrac"] < 1

    num_tokens, num_seqs = mask.sum().item(), float(mask.shape[0])
    split_lp = logprobs.clone().requires_grad_(True)
    total = 0.0
    for a, b in SPLITS:
        part, _ = policy_loss(
            split_lp[a:b], old[a:b], adv[a:b], mask[a:b], importance_weights=weights[a:b],
            num_tokens=num_tokens, num_seqs=num_seqs, **kwargs,
        )
        part.backward()  # gradient accumulation, as the learner does it
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(split_lp.grad, full_lp.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_value_loss_is_invariant_to_micro_batch_split(mode):
    torch.manual_seed(5)
    mask = ragged_mask(LENGTHS)
    old = torch.randn(mask.shape, dtype=torch.float64)
    values0 = old + 0.5 * torch.randn(mask.shape, dtype=torch.float64)
    returns = torch.randn(mask.shape, dtype=torch.float64)

    full_v = values0.clone().requires_grad_(True)
    full, _ = value_loss(full_v, old, returns, mask, loss_agg=mode)
    full.backward()

    split_v = values0.clone().requires_grad_(True)
    total = 0.0
    for a, b in SPLITS:
        part, _ = value_loss(
            split_v[a:b], old[a:b], returns[a:b], mask[a:b], loss_agg=mode,
            num_tokens=mask.sum(), num_seqs=mask.shape[0],
        )
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(split_v.grad, full_v.grad, rtol=1e-12, atol=1e-15)


# ---------- value loss ----------


def test_value_loss_hand_computed():
    # c = 0.2. Token 0: v 1.5, old 1.0, R 2.0: unclipped 0.25, clipped v 1.2 -> 0.64; loss 0.32.
    # Token 1: v 0.5, old 1.0, R 0.0: unclipped 0.25, clipped v 0.8 -> 0.64; loss 0.32.
    # Token 2: v 1.1, old 1.0, R 2.0: inside the range, both 0.81; loss 0.405.
    values = torch.tensor([[1.5, 0.5, 1.1]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 0.0, 2.0]], dtype=torch.float64)
    loss, metrics = value_loss(values, old, returns, torch.ones(1, 3))
    assert loss.item() == pytest.approx((0.32 + 0.32 + 0.405) / 3)
    assert metrics == pytest.approx({"vf_loss": loss.item(), "vf_clipfrac": 2 / 3})
    loss.backward()
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.0, (1.1 - 2.0) / 3])

    plain, metrics = value_loss(values, old, returns, torch.ones(1, 3), clip_range=None)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.81) / 3)
    assert metrics["vf_clipfrac"] == 0.0


@pytest.mark.parametrize("clip_range", [0.2, None])
def test_value_loss_matches_loop(clip_range):
    torch.manual_seed(6)
    mask = ragged_mask(LENGTHS)
    old = torch.randn(mask.shape, dtype=torch.float64)
    values = old + 0.5 * torch.randn(mask.shape, dtype=torch.float64)
    returns = torch.randn(mask.shape, dtype=torch.float64)
    rows = []
    for i, n in enumerate(LENGTHS):
        row = []
        for t in range(n):
            v, o, r = values[i, t].item(), old[i, t].item(), returns[i, t].item()
            sq = (v - r) ** 2
            if clip_range is not None:
                sq = max(sq, (min(max(v, o - clip_range), o + clip_range) - r) ** 2)
            row.append(0.5 * sq)
        rows.append(row)
    loss, _ = value_loss(values, old, returns, mask, clip_range=clip_range)
    assert loss.item() == pytest.approx(ref_aggregate(rows, "token_mean"))
