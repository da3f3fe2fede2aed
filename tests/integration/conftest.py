"""Integration fixtures: a local Ray instance shared by a test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray instance for the module (4 logical CPUs: actors take fractions)."""
    import ray

    # Workers import the test reward functions (tests/integration/rewards_for_tests.py).
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="rlrelay-tests",
             runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
                                       "PYTHONPATH": path}})
    yield ray
    ray.shutdown()
