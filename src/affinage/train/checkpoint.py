"""Checkpoints that are either complete or ignored.

The HF Trainer writes ``checkpoint-N/`` piece by piece (weights, optimizer, scheduler, RNG states,
trainer state). A job killed half-way leaves a folder that looks like a checkpoint but cannot be
resumed. We write a ``COMPLETE`` marker last, after every rank has finished writing, and only
marked folders count: resume picks the newest complete one, rotation deletes old checkpoints only
once a newer one is complete.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from affinage.run import atomic_write_text

MARKER = "COMPLETE"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    m = _CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: Path) -> list[Path]:
    """All checkpoint-N folders, complete or not, oldest step first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def complete_checkpoints(folder: Path) -> list[Path]:
    return [p for p in list_checkpoints(folder) if is_complete(p)]


def newest_complete_checkpoint(folder: Path) -> Path | None:
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def mark_complete(path: Path, step: int) -> None:
    """Written last: its presence promises every file of the checkpoint is on disk."""
    atomic_write_text(path / MARKER, json.dumps({"step": step, "time": time.time()}) + "\n")


def remove_incomplete(folder: Path) -> list[Path]:
    """Delete checkpoint folders without a marker (left by a killed job); return what was removed."""
    removed = [p for p in list_checkpoints(folder) if not is_complete(p)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def rotate(folder: Path, keep: int) -> list[Path]:
    """Keep the ``keep`` newest complete checkpoints; never touch incomplete ones."""
    done = complete_checkpoints(folder)
    old = done[:-keep] if keep > 0 else done
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old
