"""Fixtures of tests/distributed (helpers are in dist_helpers.py: a module name no other test folder uses)."""

from __future__ import annotations

import pytest
from dist_helpers import DistRuns


@pytest.fixture(scope="session")
def dist_runs(tmp_path_factory, tiny_llama_dir, demo_data) -> DistRuns:
    return DistRuns(tmp_path_factory.mktemp("dist"), tiny_llama_dir, demo_data / "droit.jsonl")
