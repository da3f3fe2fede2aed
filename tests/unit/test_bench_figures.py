"""Bench figures keep significant digits, so a tiny measurement never prints as zero; the learner
bench's one-line summary per option."""
import math

import pytest

from cluster.bench import significant, spread
from cluster.gpu_bounds import dense_peak_tflops


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


def test_the_learner_bench_brief_has_a_line_per_option_and_names_errors():
    from cluster.bench_learner import brief

    figures = {"train_tokens_per_s": {"median": 74300.0}, "update_s": {"median": 0.882}, "mfu": {"median": 0.2121},
               "peak_allocated_gib": 42.4, "planned_tensors_gib": 50.9}
    result = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "preset": "0.5b", "options": {
        "grad_op+compile": figures, "grad_op+compile+logits": {"error": "no result within 900 s (exit code None)"}},
        "batch": {"micro_batch": 8, "micro_steps": 4, "seq_len": 2048, "ragged": False}}
    lines = brief(result).splitlines()
    assert lines[0] == "NVIDIA H100 80GB HBM3, torch 2.11, preset 0.5b, micro-batch 8 x 4, seq 2048"
    assert lines[1] == "  grad_op+compile: 74.3k tok/s, update 0.882 s, MFU 21.2 %, peak 42.4 GiB (planned 50.9)"
    assert lines[2] == "  grad_op+compile+logits: ERROR no result within 900 s (exit code None)"


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA GeForce RTX 4090", None)])
def test_mfu_divides_by_the_peak_of_the_gpu_variant_not_its_family(name, peak):
    # Vendor datasheets, dense bf16 = half the sparse figure: SXM 1979, NVL 1671, H100 PCIe 1513.
    assert dense_peak_tflops(name) == peak
