"""Argument types for the command line: a bad number is refused by argparse with the flag's
name (exit 2) before anything runs, not deep in a bench after minutes of set-up."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    return _at_least(_int(text), 1, text)


def count(text: str) -> int:
    """An integer >= 0."""
    return _at_least(_int(text), 0, text)


def positive_number(text: str) -> float:
    """A finite number > 0."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def nonnegative_number(text: str) -> float:
    """A finite number >= 0."""
    return _at_least(_number(text), 0, text)


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1, e.g. ``4,8,16``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")
    return [positive_int(p) for p in parts]


def _at_least(value, low: int, text: str):
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value
