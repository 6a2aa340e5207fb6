"""The local SLURM cluster (slurm/local-cluster.sh) as a session fixture, and a small recipe."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from slurm_helpers import HARNESS, write_recipe


@dataclass(frozen=True)
class LocalCluster:
    slurm_conf: str
    start_output: str


@pytest.fixture(scope="session")
def local_cluster():
    """A running two-node cluster with SLURM_CONF set; stopped at the end if this session started it."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (its daemons run as root; packages come from apt)")
    state = os.environ.get("AFFINAGE_SLURM_DIR", "/tmp/affinage-slurm")
    was_running = subprocess.run([str(HARNESS), "status"], capture_output=True).returncode == 0
    proc = subprocess.run([str(HARNESS), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode == 77:
        pytest.skip(f"local SLURM cluster unavailable: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"slurm/local-cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = f"{state}/etc/slurm.conf"
    yield LocalCluster(os.environ["SLURM_CONF"], proc.stdout.strip())
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_running:
        subprocess.run([str(HARNESS), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "recipes")
