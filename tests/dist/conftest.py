"""Fixtures of tests/dist (helpers are in dist_helpers.py: a module name no other test folder uses)."""

from __future__ import annotations

import sys

import pytest
from dist_helpers import HERE, DistRuns


@pytest.fixture(scope="session")
def dist_runs(tmp_path_factory, tiny_llama_dir, demo_data) -> DistRuns:
    return DistRuns(tmp_path_factory.mktemp("dist"), tiny_llama_dir, demo_data / "droit.jsonl")


def _slurm_fixture():
    """tests/slurm's session fixture ``local_cluster`` (a real two-node SLURM cluster), usable here too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("affinage_slurm_conftest", HERE.parent / "slurm" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.local_cluster


local_cluster = _slurm_fixture()
