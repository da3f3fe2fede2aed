"""The learner's learning-rate schedule, and what a resume says when the config changes it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from learner.config import AlgorithmConfig, LearnerConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class LRSchedule:
    """The learning-rate multiplier of each optimizer step: linear warm-up, then constant or a
    cosine decay to ``min_lr_ratio`` at ``total_updates``.

    Example: ``LRSchedule(kind="cosine", warmup_steps=0, min_lr_ratio=0.1, total_updates=120).factor(60) == 0.55``
    """

    kind: str
    """``constant`` or ``cosine`` (``learner.lr_schedule``)."""
    warmup_steps: int
    """Optimizer steps of linear warm-up (``learner.warmup_steps``)."""
    min_lr_ratio: float
    """End of the cosine as a fraction of the peak (``learner.min_lr_ratio``)."""
    total_updates: int
    """The model's optimizer steps over the whole run, where the cosine ends: the updates per
    step (``algorithm.ppo_epochs`` x ``algorithm.minibatches``) times ``trainer.steps``, less
    ``algorithm.critic_warmup_steps`` for the policy, which sits those out."""

    def progress(self, step: int) -> float:
        """How far along the decay step ``step`` is: 0 until warm-up ends, 1 from ``total_updates`` on."""
        return min(1.0, max(0, step - self.warmup_steps) / max(1, self.total_updates - self.warmup_steps))

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind != "cosine":
            return 1.0
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))


def run_schedules(learner: LearnerConfig, algorithm: AlgorithmConfig, total_updates: int) -> dict[str, LRSchedule]:
    """The policy's and the critic's schedules over a run of ``total_updates`` optimizer steps.
    The policy sits out the critic's warm-up, so its schedule is that much shorter: sized for
    every step, its cosine would end far above min_lr_ratio."""
    warmup_updates = algorithm.critic_warmup_steps * algorithm.ppo_epochs * algorithm.minibatches
    return {name: LRSchedule(kind=learner.lr_schedule, warmup_steps=learner.warmup_steps,
                             min_lr_ratio=learner.min_lr_ratio, total_updates=max(1, total))
            for name, total in (("policy", total_updates - warmup_updates), ("critic", total_updates))}


def warmup_warning(schedule: LRSchedule, name: str, peak_key: str) -> str | None:
    """What to tell the user when the warm-up lasts the whole run: the learning rate never
    reaches its peak. Example: ``warmup_steps=20`` over 8 updates ends at 8/21 of it."""
    if schedule.warmup_steps < schedule.total_updates:
        return None
    top = schedule.factor(schedule.total_updates - 1)
    return (f"learner.warmup_steps={schedule.warmup_steps} spans all of the {name}'s {schedule.total_updates} "
            f"optimizer steps in this run (algorithm.ppo_epochs x algorithm.minibatches per step): its learning rate "
            f"ends the run at {100 * top:.0f} % of {peak_key}, never reaching it")


def settings_changed(saved_peaks: dict[str, float], peaks: dict[str, float], old: LRSchedule | None,
                     new: LRSchedule, step: int) -> list[str]:
    """The learning-rate settings of the config (``peaks`` per trained model, ``new``) that
    differ from those a checkpoint was saved under (``saved_peaks``, ``old``; None for a
    checkpoint older than the record of its schedule), at optimizer step ``step``."""
    keys = {"policy": "learner.lr", "critic": "learner.critic_lr"}
    changed = [f"{keys[name]} {saved_peaks[name]:g} to {peak:g}"
               for name, peak in peaks.items() if name in saved_peaks and saved_peaks[name] != peak]
    if old is None:
        return [*changed, "the checkpoint predates the record of its schedule, so changes to it cannot be named"]
    changed += [f"{key} {a} to {b}" for key, a, b in (("learner.lr_schedule", old.kind, new.kind),
                                                       ("learner.warmup_steps", old.warmup_steps, new.warmup_steps),
                                                       ("learner.min_lr_ratio", old.min_lr_ratio, new.min_lr_ratio))
                if a != b]
    if old.total_updates != new.total_updates:
        where = (f": the cosine goes on from {new.progress(step):.2f} of its way, where it was at "
                 f"{old.progress(step):.2f}" if old.kind == new.kind == "cosine" else "")
        changed.append(f"the schedule's length from {old.total_updates} to {new.total_updates} optimizer steps "
                       f"(trainer.steps, less algorithm.critic_warmup_steps, x algorithm.ppo_epochs x "
                       f"algorithm.minibatches){where}")
    return changed
