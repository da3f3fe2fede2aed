"""A learner call that runs out of ``learner.timeout_s`` names the ranks that did not answer and
the key that bounds them: a long update looked like a hang with nothing to say what to change.
Ray is a stand-in here (tests/integration/test_wait.py has the real deaths)."""

from __future__ import annotations

import types

import pytest

import cluster.learner_group as learner_group
from cluster.actor_set import WorkerFailure


def test_a_learner_call_past_its_timeout_names_the_silent_ranks_and_the_key(monkeypatch):
    answered = {"rank 0 result"}

    def wait(refs, num_returns=1, timeout=None):
        ready = [r for r in refs if r in answered][:num_returns]
        return ready, [r for r in refs if r not in ready]

    monkeypatch.setattr(learner_group, "ray", types.SimpleNamespace(wait=wait, get=lambda ref: ref))
    names = ["learner rank 0", "learner rank 1", "learner rank 2"]
    with pytest.raises(WorkerFailure, match=r"^no answer within 600 s from learner rank 1, learner rank 2 "
                                            r"\(learner.timeout_s\): hung, or slower than that; a longer step "
                                            r"needs a larger learner.timeout_s$"):
        learner_group.wait(["rank 0 result", "rank 1 result", "rank 2 result"], 600, names, learner_group.LIMIT)
    with pytest.raises(WorkerFailure, match=r"^no answer within 120 s from learner rank 1$"):  # no key: as before
        learner_group.wait(["rank 1 result"], 120, names[1:])
