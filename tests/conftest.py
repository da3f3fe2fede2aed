"""Shared test fixtures: tiny models built from a config (nothing can be downloaded here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test helper modules (tiny_models, integration/helpers) import by plain name.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "integration"))

from tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-tied-model"), tie=True)
