"""Paths and a small recipe for the SLURM tests (``from slurm_helpers import ...``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "slurm" / "local-cluster.sh"
JOBS = Path(__file__).resolve().parent / "jobs"


def write_recipe(folder: Path, name: str = "demo-sft", extra: str = "") -> Path:
    """A valid recipe that never loads a model here (its paths need not exist to submit)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(
        f"""name: {name}
task: sft
model: {{name_or_path: ./tiny-model, init: random}}
data: {{sources: [{{path: data/train.jsonl, format: chat}}]}}
training: {{global_batch_size: 8, micro_batch_size: 1, duration: 10 steps, learning_rate: 2e-4}}
{extra}""",
        encoding="utf-8",
    )
    return path


def last_step(run: Path) -> int:
    """The last step logged in ``run/metrics.jsonl`` (-1 before the first)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = [json.loads(line).get("step", -1) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=-1)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def assert_same_final_weights(ref_run: Path, cut_run: Path, file: str, why: str) -> None:
    """Every tensor of ``final/<file>`` bitwise equal between an uninterrupted run and a cut one."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(ref_run / "final" / file), load_file(cut_run / "final" / file)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs {why}"
