"""The one place that knows a run directory's layout.

Every stage reads and writes files here, so a stage can be rerun alone and a person can read
what happened without any server::

    runs/<name>/
      recipe.yaml          the resolved recipe (after base: and --set)
      data_stats.json      per-source records, tokens, skips, truncations
      metrics.jsonl        one line per logged step (loss, lr, grad norm, tokens)
      logs/tensorboard/    TensorBoard event files
      checkpoints/checkpoint-N/   complete only when its COMPLETE marker exists
      final/               the trained adapter (LoRA/QLoRA) or model (full), with its tokenizer
      merged/              `affinage merge`: adapter merged into the base, safetensors
      summary.json         what the run did: steps, tokens, losses, time, outputs
      timing.json          measured step/save seconds and checkpoint/stop decisions, per session
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that a reader sees the old content or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the project group must read run files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Every JSON line of an append-only file, oldest first; a line cut short by a killed writer is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def create(cls, root: str | os.PathLike) -> "RunDir":
        run = cls(Path(root).resolve())
        run.root.mkdir(parents=True, exist_ok=True)
        return run

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def data_stats(self) -> Path:
        return self.root / "data_stats.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "logs" / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def timing(self) -> Path:
        """Measured step/save seconds and walltime decisions, one entry per session (train/walltime.py)."""
        return self.root / "timing.json"

    @property
    def slurm_jobs(self) -> Path:
        """Append-only events of the run's SLURM jobs (submitted, started, requeued, ended: slurm/status.py)."""
        return self.root / "slurm" / "jobs.jsonl"

    @property
    def requeue_request(self) -> Path:
        """Written by a trainer that stopped on its own clock: the batch script requeues the job."""
        return self.root / "REQUEUE"

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        with self.metrics.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text(encoding="utf-8"))
