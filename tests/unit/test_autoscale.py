"""The rollout pool's autoscaling rule."""

import pytest

from cluster.autoscale import Autoscaler, AutoscaleRule, wait_share

RULE = AutoscaleRule(min_workers=1, max_workers=3, high=0.5, low=0.2, patience=2)


def run(shares, start=1):
    scaler, size, sizes = Autoscaler(RULE), start, []
    for share in shares:
        size = scaler.decide(share, size)
        sizes.append(size)
    return sizes


def test_grows_after_patience_then_cools_down_and_caps():
    # Two slow steps: +1; two steps without a change (which also fill the window); +1; capped at 3.
    assert run([0.9] * 10) == [1, 2, 2, 2, 3, 3, 3, 3, 3, 3]


def test_shrinks_when_the_learner_barely_waits_and_keeps_the_floor():
    assert run([0.05] * 8, start=3) == [3, 2, 2, 2, 1, 1, 1, 1]


def test_mixed_signals_do_nothing():
    assert run([0.9, 0.1, 0.9, 0.1, 0.3, 0.3], start=2) == [2] * 6


def test_wait_share_sync_and_async():
    t = {"step": 10.0, "generate": 4.0, "score": 1.0, "wait_rollout": 0.5}
    assert wait_share(t, asynchronous=False) == pytest.approx(0.5)
    assert wait_share(t, asynchronous=True) == pytest.approx(0.05)
    assert wait_share({}, asynchronous=False) == 0.0
    # A share is at most 1, whatever the timings add up to.
    assert wait_share({"step": 1.0, "generate": 2.0}, asynchronous=False) == 1.0


@pytest.mark.parametrize("rule", [AutoscaleRule(min_workers=0, max_workers=2, high=0.5, low=0.2, patience=1),
                                  AutoscaleRule(min_workers=3, max_workers=2, high=0.5, low=0.2, patience=1),
                                  AutoscaleRule(min_workers=1, max_workers=2, high=0.2, low=0.5, patience=1)])
def test_bad_rules_are_refused(rule):
    with pytest.raises(ValueError, match="autoscaling needs"):
        Autoscaler(rule)
