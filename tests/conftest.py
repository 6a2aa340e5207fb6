"""Fixtures every test package can use: tiny model folders built once per session."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from testlib import DEMO_DATA, REPO, demo_texts

HARNESS = REPO / "slurm" / "local-cluster.sh"


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.slow`` tests run only with ``AFFINAGE_SLOW=1``: the default suite must fit CI's 20 minutes."""
    if os.environ.get("AFFINAGE_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: set AFFINAGE_SLOW=1 to run")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random-init Llama with a BPE tokenizer trained on the demo text and a ChatML template."""
    from affinage.data.templates import NAMED_TEMPLATES
    from affinage.model.tiny import save_tiny_model_folder

    folder = tmp_path_factory.mktemp("tiny-llama")
    return save_tiny_model_folder(
        folder, model_type="llama", texts=demo_texts(), vocab_size=1024, seed=0, chat_template=NAMED_TEMPLATES["chatml"]
    )


@pytest.fixture(scope="session")
def demo_data() -> Path:
    return DEMO_DATA


@pytest.fixture(scope="session")
def pretrained_tiny_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama after a short full pre-training on the demo's general French text.

    LoRA adapts a model that already knows something; on a random-init base its updates barely
    move the loss, so adapter tests start from this one (it is what the demo's base stage does).
    """
    from affinage.recipe.loader import load_recipe_dict
    from affinage.run import RunDir
    from affinage.train.trainer import train

    root = tmp_path_factory.mktemp("pretrained")
    recipe = load_recipe_dict({
        "name": "pretrain-fixture", "task": "cpt", "seed": 0,
        "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
        "method": {"kind": "full"},
        "data": {"sources": [{"path": str(DEMO_DATA / "culture_generale.jsonl"), "format": "text"},
                             {"path": str(DEMO_DATA / "histoire.jsonl"), "format": "text"}], "max_length": 256},
        "training": {"global_batch_size": 8, "micro_batch_size": 4, "duration": "60 steps",
                     "learning_rate": 3e-3, "report_to": ["none"]},
        "output": {"dir": str(root / "run")},
    })
    run = RunDir.create(recipe.run_dir())
    train(recipe, run)
    return run.final


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
