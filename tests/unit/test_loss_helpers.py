"""The helpers beside the losses: KL estimators, explained variance and truncated importance
weights, against hand values and loop references."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import explained_variance, kl_penalty, truncated_importance_weights
from test_losses import LENGTHS, ragged_mask  # tests/unit is on the path under pytest


# ---------- KL estimators ----------


def test_kl_penalty_hand_values():
    # pi(x) = 0.5, ref(x) = 0.25: log ratio lp - ref = log 2.
    # k1 = log 2 = 0.693147; k2 = 0.5 * log(2)^2 = 0.240227;
    # k3 = r - 1 - log r with r = ref / pi = 0.5: 0.5 - 1 + log 2 = 0.193147.
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2), rel=1e-6)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2, rel=1e-6)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(math.log(2) - 0.5, rel=1e-6)


def test_k3_is_non_negative_and_finite_for_extreme_log_ratios():
    torch.manual_seed(11)
    lp, ref = torch.randn(64, 16) * 5, torch.randn(64, 16) * 5
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    extreme = kl_penalty(torch.tensor([[1000.0, -1000.0, 0.0]]), torch.zeros(1, 3), "k3")
    assert torch.isfinite(extreme).all()
    assert extreme[0, 2] == 0.0


def test_kl_estimators_are_unbiased_for_kl_pi_to_ref():
    # Sampling tokens from pi, k1 and k3 average to KL(pi || ref), not KL(ref || pi).
    torch.manual_seed(12)
    pi = torch.tensor([0.7, 0.2, 0.09, 0.01], dtype=torch.float64)
    ref = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    forward = (pi * (pi / ref).log()).sum().item()  # 1.2169
    reverse = (ref * (ref / pi).log()).sum().item()  # 1.6422
    x = torch.multinomial(pi, 200_000, replacement=True)
    lp, rp = pi.log()[x][None], ref.log()[x][None]
    for kind in ("k1", "k3"):
        est = kl_penalty(lp, rp, kind).mean().item()
        assert est == pytest.approx(forward, abs=0.03)
        assert abs(est - reverse) > 0.3


def test_kl_penalty_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ---------- explained variance ----------


def test_explained_variance_matches_loop_and_ignores_padding():
    torch.manual_seed(13)
    mask = ragged_mask(LENGTHS)
    returns = torch.where(mask.bool(), torch.randn(mask.shape), torch.tensor(1e6))
    values = returns + 0.5 * torch.randn(mask.shape)
    r = [returns[i, t].item() for i, n in enumerate(LENGTHS) for t in range(n)]
    v = [values[i, t].item() for i, n in enumerate(LENGTHS) for t in range(n)]

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / len(xs)

    expected = 1 - var([a - b for a, b in zip(r, v)]) / var(r)
    assert explained_variance(values, returns, mask) == pytest.approx(expected, rel=1e-6)
    assert explained_variance(returns, returns, mask) == 1.0
    constant = torch.full_like(returns, 3.0)
    assert explained_variance(constant, returns, mask) == pytest.approx(0.0, abs=1e-9)


def test_explained_variance_constant_returns_is_zero_not_nan():
    returns = torch.full((2, 3), 1.5)
    assert explained_variance(torch.randn(2, 3), returns, torch.ones(2, 3)) == 0.0


# ---------- truncated importance sampling ----------


def test_truncated_importance_weights_hand_values():
    # old - rollout = [log 3, log 0.5, 0 | padding]; cap 2 -> weights [2, 0.5, 1, 0].
    old = torch.tensor([[math.log(3.0), math.log(0.5), 0.0, 50.0]])
    rollout = torch.zeros(1, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    w, metrics = truncated_importance_weights(old, rollout, mask, cap=2.0)
    assert w[0].tolist() == pytest.approx([2.0, 0.5, 1.0, 0.0])
    assert not w.requires_grad
    assert metrics == pytest.approx({
        "tis/weight_mean": 3.5 / 3,
        "tis/weight_max": 2.0,
        "tis/clipped_frac": 1 / 3,
    })


def test_truncated_importance_weights_rejects_non_positive_cap():
    with pytest.raises(ValueError, match="cap"):
        zeros = torch.zeros(1, 1)
        truncated_importance_weights(zeros, zeros, torch.ones(1, 1), cap=0.0)
