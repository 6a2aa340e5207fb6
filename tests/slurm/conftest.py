"""A small recipe for the SLURM tests (the local cluster fixture is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_helpers import write_recipe


@pytest.fixture
def recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "recipes")
