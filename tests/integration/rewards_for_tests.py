"""Reward functions for integration tests, resolved by import path (`rewards_for_tests:length`)."""


def length(prompt: str, response: str, answer: str | None) -> float:
    """Longer responses score higher: varies from sample to sample even for a random model,
    so every step has a real learning signal."""
    return len(response) / 8.0


def paced_length(prompt: str, response: str, answer: str | None) -> float:
    """``length``'s values at 20 ms a sample: a run that is killed "right after" a checkpoint
    appears then has seconds, not a fraction of one, before its next checkpoint."""
    import time

    time.sleep(0.02)
    return length(prompt, response, answer)


def slow_length(prompt: str, response: str, answer: str | None) -> float:
    """Like ``length`` unscaled, but takes 20 ms a sample, so a scoring call lasts long enough
    to be interrupted."""
    import time

    time.sleep(0.02)
    return float(len(response))


def backtracking_length(prompt: str, response: str, answer: str | None) -> float:
    """Like ``length`` unscaled, but a 7-character response sends the regex engine into
    exponential backtracking, which holds the GIL for as long as it runs (for ever, in effect)."""
    import re

    if len(response) == 7:
        re.match(r"(a+)+$", "a" * 64 + "b")
    return float(len(response))
