"""The driver's stop rule for non-finite updates: skipped steps are counted, a finite step
resets the count, and the N-th skip in a row writes a checkpoint and stops the run."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.config import Config
from cluster.controller import Controller, TrainingDiverged


def driver(limit: int) -> SimpleNamespace:
    """Just the state ``guard_against_divergence`` reads; ``save`` records the step it was asked for."""
    cfg = Config()
    cfg.trainer.max_skipped_updates = limit
    saved: list[int] = []
    return SimpleNamespace(cfg=cfg, consecutive_skips=0, saved=saved,
                           save=lambda step: saved.append(step) or Path(f"ckpt/step-{step}"))


def test_skips_in_a_row_stop_with_a_checkpoint_and_a_finite_step_resets_the_count():
    d = driver(limit=3)
    guard = Controller.guard_against_divergence
    for step, skipped in enumerate([1.0, 1.0, 0.0, 1.0, 1.0], start=1):
        guard(d, step, {"policy/skipped_updates": skipped})
    assert d.consecutive_skips == 2 and d.saved == []
    with pytest.raises(TrainingDiverged, match="3 steps in a row.*ckpt/step-6"):
        guard(d, 6, {"policy/skipped_updates": 1.0})
    assert d.saved == [6]


def test_every_skipped_step_is_logged_not_only_the_last(caplog):
    # A run skipping every other step never reaches the limit, and said nothing.
    d = driver(limit=3)
    with caplog.at_level(logging.WARNING, logger="rlrelay"):
        for step, skipped in enumerate([2.0, 0.0, 1.0], start=1):
            Controller.guard_against_divergence(d, step, {"policy/skipped_updates": skipped})
    assert [r.getMessage().split(",")[0] for r in caplog.records] == \
        ["step 1: 2 optimizer step(s) skipped", "step 3: 1 optimizer step(s) skipped"]
