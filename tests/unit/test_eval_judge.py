"""The eval judge runs on the driver: a user's function there must not be able to hang or end
it, so it runs in a child process under a timeout; a call that fails counts as wrong and as a
judge failure."""

from __future__ import annotations

import time

import pytest

from reward.judge import EvalJudge


def test_a_builtin_judge_runs_in_process(monkeypatch):
    # No child process is started for it (the verdicts alone would be the same from a child).
    monkeypatch.setattr("reward.judge.FunctionProcess", lambda *a, **k: pytest.fail("started a child process"))
    judge = EvalJudge("exact_match", timeout_s=1.0)
    assert judge("12+30=", "42", "42") == 1.0 and judge("12+30=", "43", "42") == 0.0
    judge.close()


def test_a_user_judge_that_hangs_raises_or_exits_fails_its_call_only(user_rewards):
    slow = EvalJudge(f"{user_rewards}:slow", timeout_s=1.0)
    started = time.monotonic()
    assert slow("p", "hang", None) is None and "timed_out" in slow.last_error
    assert time.monotonic() - started < 30  # bounded by the timeout (and a child's restart)
    assert slow("p", "fine", None) == 1.0  # a fresh child after the kill
    slow.close()
    boom = EvalJudge(f"{user_rewards}:boom", timeout_s=5.0)
    assert boom("p", "bad", None) is None and "KeyError" in boom.last_error
    assert boom("p", "good", None) == 1.0
    boom.close()
    exits = EvalJudge(f"{user_rewards}:exits", timeout_s=5.0)
    assert exits("p", "exit", None) is None and "crashed" in exits.last_error
    exits.close()
    text = EvalJudge(f"{user_rewards}:text", timeout_s=5.0)
    assert text("p", "r", None) is None and "not_a_number" in text.last_error
    text.close()


def test_a_judge_that_returns_no_finite_number_fails_its_call(user_rewards):
    # NaN counted as a silent wrong answer and inf as a right one; a reward treats both as failures.
    judge = EvalJudge(f"{user_rewards}:nonfinite", timeout_s=5.0)
    for response in ("nan", "inf"):
        assert judge("p", response, None) is None and f"returned {response}" in judge.last_error
    assert judge("p", "fine", None) == 2.0
    judge.close()


def test_a_builtin_judge_that_raises_fails_its_call_instead_of_the_evaluation():
    judge = EvalJudge("exact_match", timeout_s=1.0)
    assert judge("p", "42", None) is None and "ValueError" in judge.last_error
    judge.close()
