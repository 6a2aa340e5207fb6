"""Paths and a small recipe for the SLURM tests (``from slurm_helpers import ...``)."""

from __future__ import annotations

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
