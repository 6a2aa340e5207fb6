"""Who may write a run directory: one ``affinage train`` at a time, and only into a run of its own recipe.

Training deletes things in a run directory (incomplete checkpoints, ``checkpoints/`` with ``--fresh``,
``final.tmp/``, an old ``final/``). Before it does, :func:`check_run_dir` refuses a folder that holds
anything affinage did not write, or a run of another recipe, whatever ``--fresh`` says: a mistyped
``--run-dir`` must never cost a user their files.

:class:`RunLock` is an ``flock`` on ``RUN_DIR/.affinage.lock``: the kernel drops it when the process
dies, so a killed run never leaves it stuck, and a second ``train`` on the same folder is refused with
the first one's host and pid (written in the lock file).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

import yaml

from affinage.errors import UserError
from affinage.paths import ancestors
from affinage.run import RunDir

LOCK_NAME = ".affinage.lock"

# Every top-level entry affinage writes in a run directory: RunDir's layout (the one home of its paths),
# plus the lock and what smoke and preference runs add; atomic writes leave ".<name>.<random>" files.
KNOWN_ENTRIES = RunDir.top_level_names() | {LOCK_NAME, "ai_act_summary.md", "tiny-model", "cache", "reference", "start"}


class RunDirError(UserError):
    """A run directory affinage will not write into (or cannot)."""


def check_run_dir_path(path: str | os.PathLike, what: str = "--run-dir") -> Path:
    """The run directory as a path; refuses one that exists as a file (or anything else but a folder)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"{what} {p} is an existing file, not a folder: give a folder (it is created if missing), "
                          "e.g. --run-dir runs/my-run")
    parent = next((q for q in ancestors(p.absolute())[1:] if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise RunDirError(f"{what} {p}: {parent} is a file, so no folder can be made there")
    return p


def _is_ours(name: str) -> bool:
    return name in KNOWN_ENTRIES or any(name.startswith(f".{k}.") for k in KNOWN_ENTRIES)


def _recipe_name(path: Path) -> Optional[str]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, yaml.YAMLError):
        return None
    return data.get("name") if isinstance(data, dict) else None


def check_run_dir(root: str | os.PathLike, recipe_name: str) -> None:
    """Refuse a folder holding files affinage did not write, or a run of another recipe (never cleaned)."""
    root = Path(root)
    if not root.is_dir():
        return
    entries = sorted(p.name for p in root.iterdir())
    foreign = [n for n in entries if not _is_ours(n)]
    ckpts = root / "checkpoints"
    if ckpts.is_dir():
        foreign += [f"checkpoints/{p.name}" for p in sorted(ckpts.iterdir())
                    if not (p.is_dir() and p.name.removeprefix("corrupt-").startswith("checkpoint-")
                            and p.name.removeprefix("corrupt-")[11:].isdigit())]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(f"run directory {root} holds files affinage did not write ({shown}); affinage cleans "
                          "checkpoints in its run directories, so it will not train here, with or without --fresh. "
                          "Give another --run-dir (or output.dir), or move those files away yourself")
    recipe = root / "recipe.yaml"
    touches = [n for n in ("checkpoints", "final", "final.tmp", "merged") if (root / n).exists()]
    if recipe.is_file():
        found = _recipe_name(recipe)
        if found != recipe_name:
            what = f"a run of recipe {found!r}" if found else "a recipe.yaml affinage cannot read"
            raise RunDirError(f"run directory {root} holds {what}, not of {recipe_name!r}; it is never cleaned, "
                              "with or without --fresh. Give another --run-dir (or output.dir), or remove that run yourself")
    elif touches:
        raise RunDirError(f"run directory {root} has {', '.join(touches)}/ but no recipe.yaml: it is not an affinage run "
                          "(or its recipe.yaml was removed), so affinage will not clean it, with or without --fresh. "
                          "Give another --run-dir, or remove those folders yourself")


class RunLock:
    """An exclusive, non-blocking ``flock`` on the run directory, held for the life of the process."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._fh = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "another process"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
        return f"another affinage {info.get('command', 'train')} (host {info.get('host')}, pid {info.get('pid')}, since {since})"

    def acquire(self, command: str = "train", record: bool = True) -> "RunLock":
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RunDirError(f"run directory {self.root} is in use by {self._holder()}: wait for it to finish, or stop "
                              f"it (touch {self.root / 'STOP'} for a clean stop at the next step); two trainings "
                              "cannot share a run directory") from None
        if record:
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": command, "started": time.time()}))
            fh.flush()
        self._fh = fh
        return self

    def check_free(self) -> None:
        """Refuse now if another process holds the lock (a launcher checks before starting its workers)."""
        if (self.root / LOCK_NAME).exists():
            self.acquire(record=False).release()

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock; the file stays (its content is only informative)
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
