"""The learning-rate schedules of a run and the warning when the warm-up outlasts it; the
cosine's floor, and the resume warning's naming of a changed schedule (a cosine decaying to 0
instead of ``learner.min_lr_ratio``, or an empty reason, passed every test before these)."""

from __future__ import annotations

import pytest

from cluster.config import load_config
from learner.schedule import LRSchedule, run_schedules, settings_changed, warmup_warning


def test_the_policy_schedule_is_shorter_by_the_critics_warm_up():
    cfg = load_config(None, ["algorithm.advantage_estimator=gae", "algorithm.critic_warmup_steps=3",
                             "algorithm.ppo_epochs=2", "algorithm.minibatches=2", "learner.warmup_steps=4",
                             "learner.lr_schedule=cosine", "learner.min_lr_ratio=0.1", "trainer.steps=10"])
    schedules = run_schedules(cfg.learner, cfg.algorithm, total_updates=10 * 4)
    assert schedules["critic"] == LRSchedule(kind="cosine", warmup_steps=4, min_lr_ratio=0.1, total_updates=40)
    assert schedules["policy"] == LRSchedule(kind="cosine", warmup_steps=4, min_lr_ratio=0.1, total_updates=40 - 3 * 4)


def test_a_warm_up_longer_than_the_run_is_named_with_the_share_of_the_peak_reached():
    fits = LRSchedule(kind="constant", warmup_steps=7, min_lr_ratio=0.0, total_updates=8)
    assert warmup_warning(fits, "policy", "learner.lr") is None
    assert fits.factor(7) == 1.0  # the last step runs at the peak
    whole = LRSchedule(kind="constant", warmup_steps=1, min_lr_ratio=0.0, total_updates=1)
    assert "ends the run at 50 % of learner.critic_lr" in warmup_warning(whole, "critic", "learner.critic_lr")
    long = LRSchedule(kind="cosine", warmup_steps=20, min_lr_ratio=0.0, total_updates=8)
    message = warmup_warning(long, "policy", "learner.lr")
    # The last of the 8 steps runs at (7 + 1) / (20 + 1) of the peak.
    assert message == ("learner.warmup_steps=20 spans all of the policy's 8 optimizer steps in this run "
                       "(algorithm.ppo_epochs x algorithm.minibatches per step): its learning rate ends "
                       "the run at 38 % of learner.lr, never reaching it")


def test_the_cosine_ends_at_min_lr_ratio_of_the_peak_not_at_zero():
    schedule = LRSchedule(kind="cosine", warmup_steps=0, min_lr_ratio=0.1, total_updates=120)
    assert schedule.factor(0) == 1.0
    # Half way: 0.1 + 0.9 * 0.5 * (1 + cos(pi / 2)) = 0.55 (the class docstring's example);
    # cos(pi / 2) is 6e-17 in floating point, hence approx.
    assert schedule.factor(60) == pytest.approx(0.55, rel=1e-12)
    # At the end cos(pi) is exactly -1: the floor itself, and it stays there past the end.
    assert schedule.factor(120) == 0.1
    assert schedule.factor(200) == 0.1


def test_the_floor_applies_after_a_warm_up_too():
    # Warm-up 4 of 24 updates: the decay runs over the remaining 20, so step 14 is half way.
    schedule = LRSchedule(kind="cosine", warmup_steps=4, min_lr_ratio=0.2, total_updates=24)
    assert schedule.factor(3) == 4 / 5  # the last warm-up step: (3 + 1) / (4 + 1)
    assert schedule.factor(14) == pytest.approx(0.6, rel=1e-12)  # 0.2 + 0.8 * 0.5
    assert schedule.factor(24) == 0.2


def test_a_resume_names_each_changed_schedule_setting():
    old = LRSchedule(kind="constant", warmup_steps=2, min_lr_ratio=0.0, total_updates=40)
    new = LRSchedule(kind="cosine", warmup_steps=4, min_lr_ratio=0.1, total_updates=40)
    # Same peak and length: the three settings are the only reason, and each is named.
    assert settings_changed({"policy": 1e-3}, {"policy": 1e-3}, old, new, step=10) == [
        "learner.lr_schedule constant to cosine", "learner.warmup_steps 2 to 4", "learner.min_lr_ratio 0.0 to 0.1"]


def test_a_resume_names_only_the_schedule_setting_that_changed():
    old = LRSchedule(kind="cosine", warmup_steps=2, min_lr_ratio=0.0, total_updates=40)
    assert settings_changed({"policy": 1e-3}, {"policy": 1e-3}, old, old, step=10) == []
    floor = LRSchedule(kind="cosine", warmup_steps=2, min_lr_ratio=0.05, total_updates=40)
    assert settings_changed({"policy": 1e-3}, {"policy": 1e-3}, old, floor, step=10) == [
        "learner.min_lr_ratio 0.0 to 0.05"]
