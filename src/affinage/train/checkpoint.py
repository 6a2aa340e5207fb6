"""Checkpoints that are either complete or ignored.

The HF Trainer writes ``checkpoint-N/`` piece by piece (weights, optimizer, scheduler, RNG states,
trainer state). A job killed half-way leaves a folder that looks like a checkpoint but cannot be
resumed. We write a ``COMPLETE`` marker last, after every rank has finished writing, and only
marked folders count: resume picks the newest complete one, rotation deletes old checkpoints only
once a newer one is complete.

The marker also records every file's size and checksum (``affinage.integrity``). Resume verifies
the newest complete checkpoint before trusting it, with its ``trainer_state.json`` (readable, same
step): a truncated file, flipped bytes or a broken state is reported, the folder is set aside as
``corrupt-checkpoint-N`` and the previous complete checkpoint is used instead (two are kept by
default, ``training.keep_checkpoints``), never garbage.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from affinage import integrity
from affinage.errors import UserError
from affinage.run import atomic_write_text

MARKER = "COMPLETE"
CORRUPT_PREFIX = "corrupt-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(UserError):
    """No checkpoint of the run can be trusted."""


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
    """Written last: its presence promises every file of the checkpoint is on disk, with these sizes and checksums."""
    record = {"step": step, "time": time.time(), **integrity.manifest(path, exclude=(MARKER,))}
    atomic_write_text(path / MARKER, json.dumps(record) + "\n")


def problem(path: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed from (None when its files and state check out)."""
    try:
        record = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"its {MARKER} marker is unreadable ({e})"
    if not isinstance(record, dict):
        return f"its {MARKER} marker is not a JSON object"
    step = checkpoint_step(path)
    if record.get("step") != step:
        return f"its {MARKER} marker is for step {record.get('step')}, not {step}"
    if "files" in record:  # markers written before affinage recorded checksums are trusted as they are
        wrong = integrity.verify(path, record)
        if wrong:
            return wrong
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        global_step = state["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its trainer_state.json is unreadable ({type(e).__name__}: {e})"
    if global_step != step:
        return f"its trainer_state.json says step {global_step}, not {step}"
    return None


def newest_resumable(folder: Path, say=print, set_aside: bool = True) -> Path | None:
    """The newest complete checkpoint that verifies; corrupt newer ones are reported (and set aside).

    Raises :class:`CheckpointError` when complete checkpoints exist but none verifies: training from
    step 0 over a run that had progress would silently throw it away.
    """
    done = complete_checkpoints(folder)
    bad: list[str] = []
    for path in reversed(done):
        why = problem(path)
        if why is None:
            if bad:
                say(f"affinage: resuming from the previous complete checkpoint, {path.name}")
            return path
        bad.append(f"{path.name}: {why}")
        say(f"affinage: checkpoint {path} is corrupt: {why}; it is not used"
            + (f" (moved to {CORRUPT_PREFIX}{path.name})" if set_aside else ""))
        if set_aside:
            target = path.with_name(CORRUPT_PREFIX + path.name)
            shutil.rmtree(target, ignore_errors=True)
            try:
                path.rename(target)
            except OSError:
                pass  # another rank moved it already
    if bad:
        raise CheckpointError(
            f"no checkpoint in {folder} can be resumed from: " + "; ".join(bad)
            + ". Rerun with --fresh to start over (the corrupt folders are kept as corrupt-checkpoint-N to inspect)")
    return None


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
