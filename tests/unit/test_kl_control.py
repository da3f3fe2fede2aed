"""KL controllers and the running reward normaliser: behaviour and checkpoint round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from learner.kl_control import AdaptiveKLController, FixedKLController, RunningMeanStd


def json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))


def test_fixed_controller_never_moves_and_round_trips():
    ctl = FixedKLController(coef=0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    ctl.update(current_kl=0.0, n_steps=512)
    assert ctl.coef == 0.05
    other = FixedKLController(coef=1.0)
    other.load_state_dict(json_round_trip(ctl.state_dict()))
    assert other.coef == 0.05


def test_adaptive_controller_hand_values():
    # target 6, horizon 1000, 100 samples per update.
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=1000)
    # KL 6.6: error 0.1 (inside the clip) -> coef * (1 + 0.1 * 100 / 1000) = 0.1 * 1.01
    ctl.update(current_kl=6.6, n_steps=100)
    assert ctl.coef == pytest.approx(0.101)
    # KL 60: error 9 clipped to 0.2 -> * 1.02
    ctl.update(current_kl=60.0, n_steps=100)
    assert ctl.coef == pytest.approx(0.101 * 1.02)
    # KL 0: error -1 clipped to -0.2 -> * 0.98
    ctl.update(current_kl=0.0, n_steps=100)
    assert ctl.coef == pytest.approx(0.101 * 1.02 * 0.98)
    # On target: unchanged.
    before = ctl.coef
    ctl.update(current_kl=6.0, n_steps=100)
    assert ctl.coef == before


def test_adaptive_controller_direction_and_bounded_step():
    horizon, n_steps = 10_000, 256
    for kl, up in [(0.5, True), (0.055, True), (0.045, False), (1e-6, False)]:
        ctl = AdaptiveKLController(init_coef=0.2, target=0.05, horizon=horizon)
        ctl.update(current_kl=kl, n_steps=n_steps)
        assert (ctl.coef > 0.2) == up
        # Never more than the 20% clip times the fraction of the horizon covered.
        assert abs(ctl.coef / 0.2 - 1) <= 0.2 * n_steps / horizon + 1e-12


def test_adaptive_controller_stays_positive_with_a_horizon_shorter_than_a_batch():
    # horizon 5, 32 samples: 1 + (-0.2) * 32 / 5 = -0.28 made the coefficient negative, which
    # the estimator then treated as "no KL" (QA: kl/coef -0.014, -0.032, -0.073).
    ctl = AdaptiveKLController(init_coef=0.05, target=0.01, horizon=5)
    for _ in range(3):
        ctl.update(current_kl=0.0, n_steps=32)
    assert ctl.coef == pytest.approx(0.05 * 0.5 ** 3)
    ctl.update(current_kl=1.0, n_steps=32)  # far over target: at most doubled
    assert ctl.coef == pytest.approx(0.05 * 0.5 ** 3 * 2)


def test_adaptive_controller_round_trip_continues_identically():
    a = AdaptiveKLController(init_coef=0.1, target=0.05, horizon=1000)
    for kl in (0.2, 0.01, 0.07):
        a.update(kl, n_steps=64)
    b = AdaptiveKLController(init_coef=0.1, target=0.05, horizon=1000)
    b.load_state_dict(json_round_trip(a.state_dict()))
    assert b.coef == a.coef != 0.1
    for kl in (0.3, 0.0):
        a.update(kl, 64)
        b.update(kl, 64)
    assert b.coef == a.coef


@pytest.mark.parametrize("target,horizon", [(0.0, 100), (0.1, 0)])
def test_adaptive_controller_rejects_bad_hyperparameters(target, horizon):
    with pytest.raises(ValueError, match="target and horizon must be > 0"):
        AdaptiveKLController(init_coef=0.1, target=target, horizon=horizon)


def test_running_mean_std_matches_numpy_over_the_stream():
    torch.manual_seed(0)
    rms = RunningMeanStd()
    sizes_scales_means = [(7, 1.0, 0.0), (1, 1.0, 5.0), (64, 3.0, -2.0), (13, 0.1, 10.0)]
    batches = [torch.randn(n) * s + m for n, s, m in sizes_scales_means]
    seen = []
    for batch in batches:
        rms.update(batch)
        seen.append(batch.double().numpy())
        stream = np.concatenate(seen)
        assert rms.count == stream.size
        assert rms.mean == pytest.approx(stream.mean(), rel=1e-9, abs=1e-12)
        assert rms.var == pytest.approx(stream.var(), rel=1e-9)  # population variance
    rms.update(torch.empty(0))  # an empty batch changes nothing
    assert rms.count == stream.size


def test_running_mean_std_normalize_and_clip():
    rms = RunningMeanStd()
    rms.update(torch.tensor([1.0, 3.0, 5.0, 7.0]))  # mean 4, var 5
    x = torch.tensor([4.0, 4.0 + 5**0.5, 100.0])
    assert rms.normalize(x).tolist() == pytest.approx([0.0, 1.0, 96 / 5**0.5])
    assert rms.normalize(x, clip=5.0).tolist() == pytest.approx([0.0, 1.0, 5.0])
    assert rms.normalize(-x, clip=5.0).tolist()[2] == pytest.approx(-5.0)  # both sides are clipped


def test_running_mean_std_round_trip_continues_identically():
    torch.manual_seed(1)
    a = RunningMeanStd()
    a.update(torch.randn(10))
    a.update(torch.randn(3) + 2)
    b = RunningMeanStd()
    b.load_state_dict(json_round_trip(a.state_dict()))
    assert b.state_dict() == a.state_dict()
    more = torch.randn(5)
    a.update(more)
    b.update(more)
    assert b.state_dict() == a.state_dict()
    assert b.count == 18


def test_reward_normalisation_refuses_a_non_finite_reward():
    rms = RunningMeanStd()
    rms.update(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="1 non-finite reward"):
        rms.update(torch.tensor([1.0, float("inf")]))
    assert rms.mean == 1.5 and rms.count == 2  # unchanged


def test_a_non_finite_kl_leaves_the_adaptive_coefficient_as_it_is():
    # NaN log-probs gave a NaN kl/value; folded in, the coefficient stayed NaN for good (and
    # went into every later checkpoint).
    ctl = AdaptiveKLController(init_coef=0.1, target=0.05, horizon=1000)
    for kl in (float("nan"), float("inf")):
        ctl.update(kl, n_steps=64)
        assert ctl.coef == 0.1
    ctl.update(0.1, n_steps=64)
    assert ctl.coef > 0.1
