"""The rollout pool's autoscaling rule (``rollout.autoscale``, off by default).

The learner should not sit waiting for rollouts. The share of each step the learner spends
waiting on generation and scoring is watched; when it stays above ``autoscale_high`` for
``autoscale_patience`` steps the pool grows by one worker, when it stays below
``autoscale_low`` it shrinks by one, always within ``[min_workers, max_workers]``, and a
change is followed by ``autoscale_patience`` steps without another (the new worker needs
time to start and to show its effect).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class AutoscaleRule:
    """Thresholds of the rule (from ``rollout.*``).

    Example: ``AutoscaleRule(min_workers=1, max_workers=8, high=0.5, low=0.2, patience=3)``
    """

    min_workers: int
    """Never fewer workers."""
    max_workers: int
    """Never more workers."""
    high: float
    """Grow when the learner waits longer than this share of the step."""
    low: float
    """Shrink when it waits less than this share."""
    patience: int
    """Steps the condition must hold, and steps to leave between two changes."""


def wait_share(timings: dict[str, float], asynchronous: bool) -> float:
    """Share of the step the learner spent waiting on rollouts.

    Synchronous: the whole of generation and scoring (the learner idles meanwhile).
    Asynchronous: only the time it blocked on a batch that was not ready yet."""
    step = timings.get("step", 0.0)
    if step <= 0:
        return 0.0
    waited = timings.get("wait_rollout", 0.0) if asynchronous else \
        timings.get("generate", 0.0) + timings.get("score", 0.0)
    return min(1.0, waited / step)


class Autoscaler:
    """Feeds on one wait share per step; answers the pool size to have."""

    def __init__(self, rule: AutoscaleRule) -> None:
        if not 1 <= rule.min_workers <= rule.max_workers:
            raise ValueError(f"autoscaling needs 1 <= min_workers ({rule.min_workers}) <= max_workers "
                             f"({rule.max_workers})")
        if not 0 <= rule.low < rule.high <= 1:
            raise ValueError(f"autoscaling needs 0 <= low ({rule.low}) < high ({rule.high}) <= 1")
        self.rule = rule
        self.recent: deque[float] = deque(maxlen=rule.patience)
        self.cooldown = 0

    def decide(self, share: float, current: int) -> int:
        rule = self.rule
        self.recent.append(share)
        if self.cooldown > 0:
            self.cooldown -= 1
            return current
        target = current
        if len(self.recent) == rule.patience:
            if min(self.recent) > rule.high:
                target = current + 1
            elif max(self.recent) < rule.low:
                target = current - 1
        target = max(rule.min_workers, min(rule.max_workers, target))
        if target != current:
            self.cooldown = rule.patience
            self.recent.clear()
        return target
