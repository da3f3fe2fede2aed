"""The learning-rate schedules of a run and the warning when the warm-up outlasts it."""

from __future__ import annotations

from cluster.config import load_config
from learner.schedule import LRSchedule, run_schedules, warmup_warning


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
