"""The files affinage ships beside its code, found the same way in a checkout and in a wheel.

Everything that is not Python but belongs to the package lives under this folder and is read only
through this module (``importlib.resources``), never by walking up from a source file:

- ``clusters/<name>.yaml``: cluster profiles (``--cluster NAME``);
- ``deepspeed/<strategy>.json``, ``accelerate/fsdp2.yaml``: the files a sharding strategy starts from;
- ``slurm/job.sbatch.j2``: the job template every stage is rendered from;
- ``recipes/``: the shipped recipes, demo corpus, eval sets and tiny model config (in a checkout a
  link to the top-level ``recipes/``; a wheel holds a copy).

In a checkout, ``configs/clusters`` etc. are links into this folder, so the files a researcher reads
and edits are the ones the package uses. A user's own file is always given by path, never copied here.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Optional

from affinage.errors import UserError

# kind -> suffix of its files (names are given without it)
KINDS = {"clusters": ".yaml", "deepspeed": ".json", "accelerate": ".yaml", "slurm": ".j2", "recipes": ".yaml"}


class ResourceError(UserError, LookupError):
    """A shipped file asked for by a name that does not exist; ``str()`` lists the valid names."""


def _root() -> Path:
    root = importlib.resources.files(__name__)
    if not isinstance(root, Path):  # a zipped install: resources are read as folders, so refuse clearly
        raise RuntimeError(f"affinage must be installed as files, not from a zip archive ({root})")
    return root


def resource_dir(kind: str) -> Path:
    """The folder of one kind of shipped file (``clusters``, ``deepspeed``, ...)."""
    if kind not in KINDS:
        raise ValueError(f"unknown resource kind {kind!r}; kinds: {', '.join(KINDS)}")
    return _root() / kind


def list_resources(kind: str) -> list[str]:
    """Names (without suffix) of the shipped files of ``kind`` directly in its folder, sorted."""
    suffix = KINDS[kind] if kind in KINDS else None
    folder = resource_dir(kind)
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}") if p.is_file())


def resource_path(kind: str, name: str) -> Path:
    """The shipped file ``name`` of ``kind`` (suffix optional); a ResourceError names the valid ones."""
    suffix = KINDS[kind] if kind in KINDS else ""
    folder = resource_dir(kind)
    path = folder / (name if name.endswith(suffix) else name + suffix)
    if not path.is_file() or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ResourceError(f"no shipped {kind} file {name!r}. Valid choices: {', '.join(list_resources(kind))}")
    return path


def source_checkout() -> Optional[Path]:
    """The git checkout affinage runs from (``<root>/src/affinage``, ``<root>/.git``), or None.

    An installed affinage (wheel, git URL) sits in ``site-packages``: None, and nothing above the
    package is looked at, so a venv that happens to live inside another repository is not taken
    for an affinage checkout.
    """
    package = Path(str(importlib.resources.files("affinage"))).resolve()
    root = package.parent.parent
    if package.parent.name == "src" and (root / "pyproject.toml").is_file() and (root / ".git").exists():
        return root
    return None
