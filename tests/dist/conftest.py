"""Fixtures of tests/dist (helpers are in dist_helpers.py: a module name no other test folder uses)."""

from __future__ import annotations

import os
import subprocess

import pytest
from dist_helpers import HERE, DistRuns


@pytest.fixture(scope="session")
def dist_runs(tmp_path_factory, tiny_llama_dir, demo_data) -> DistRuns:
    return DistRuns(tmp_path_factory.mktemp("dist"), tiny_llama_dir, demo_data / "droit.jsonl")


@pytest.fixture(scope="session")
def local_cluster():
    """The local two-node SLURM cluster (slurm/local-cluster.sh, as tests/slurm uses it), SLURM_CONF set.

    Stopped at the end only if this fixture started it (tests/slurm may have started it already).
    """
    harness = HERE.parents[1] / "slurm" / "local-cluster.sh"
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (its daemons run as root; packages come from apt)")
    state = os.environ.get("AFFINAGE_SLURM_DIR", "/tmp/affinage-slurm")
    was_running = subprocess.run([str(harness), "status"], capture_output=True).returncode == 0
    proc = subprocess.run([str(harness), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode == 77:
        pytest.skip(f"local SLURM cluster unavailable: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"slurm/local-cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = f"{state}/etc/slurm.conf"
    yield os.environ["SLURM_CONF"]
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_running:
        subprocess.run([str(harness), "stop"], capture_output=True, timeout=120)
