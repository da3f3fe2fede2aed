"""Bench figures keep significant digits, so a tiny measurement never prints as zero."""
import math

import pytest

from cluster.bench import significant, spread


@pytest.mark.parametrize("x, expected", [
    (3.14159e-5, 3.142e-5),  # a copy bound on a tiny model: fixed decimals made this 0.0 in CI
    (0.0123456, 0.01235),
    (1234.5678, 1235.0),
    (-0.00098765, -0.0009877),
])
def test_significant_keeps_four_digits_at_any_scale(x, expected):
    assert significant(x) == pytest.approx(expected, rel=1e-9)
    assert significant(x) != 0


def test_significant_passes_zero_and_non_finite_through():
    assert significant(0.0) == 0.0
    assert math.isinf(significant(float("inf")))
    assert math.isnan(significant(float("nan")))


def test_spread_reports_median_min_max_and_runs():
    out = spread([2e-5, 1e-5, 3e-5])
    assert out == {"median": 2e-5, "min": 1e-5, "max": 3e-5, "runs": [2e-5, 1e-5, 3e-5]}
    with pytest.raises(ValueError, match="no measurements"):
        spread([])
