"""The shipped recipes, for a user who installed affinage rather than cloned it (``tune ls``/``tune cp``).

``affinage recipes list`` shows every recipe of the package's ``recipes/`` tree (laid out
``<model>/<method>/<variant>.yaml``; ``_base/`` holds shared ``base:`` files, not recipes).
``affinage recipes copy NAME DEST`` copies one recipe with everything it names inside that tree
(its ``base:`` chain, the demo corpus, eval sets and tiny model config) into ``DEST``, keeping the
tree's layout: recipe paths are relative to the recipe file, so they resolve in the copy unchanged,
and ``$VARS`` stay for the machine that runs it. Nothing is overwritten.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from affinage.errors import UserError
from affinage.resources import resource_dir

# Files that travel with any file copied from their folder: the licence and notes of a data set.
COMPANIONS = ("LICENCE*", "LICENSE*", "README*")


class CatalogError(UserError):
    """A recipe name the package does not ship, or a copy that would overwrite files."""


@dataclass(frozen=True)
class Entry:
    """One shipped recipe as ``recipes list`` shows it."""

    key: str  # what ``recipes copy`` takes: its path in the tree without .yaml (demo/full/cpt)
    path: Path
    name: str = ""
    task: str = ""
    method: str = ""
    model: str = ""
    description: str = ""
    output: str = ""  # output.dir as written (runs/demo-cpt)
    error: Optional[str] = None  # the loader's message when the recipe does not load


def recipes_root() -> Path:
    return resource_dir("recipes")


def _shown(value: str) -> str:
    """A path inside the tree as written relative to it (``demo/model``); anything else as is."""
    root = str(recipes_root())
    return os.path.relpath(value, root) if os.path.isabs(value) and _inside(value) else value


def _inside(value: str) -> bool:
    root = str(recipes_root())
    return os.path.commonpath([os.path.abspath(value), root]) == root


def recipe_files() -> list[Path]:
    """Every ``<model>/<method>/<variant>.yaml`` of the tree, sorted; ``_base/`` and data folders left out."""
    root = recipes_root()
    return sorted(p for p in root.glob("*/*/*.yaml") if p.is_file() and not p.relative_to(root).parts[0].startswith("_"))


def catalog() -> list[Entry]:
    """Every shipped recipe, loaded (a recipe that does not load is listed with its error)."""
    from affinage.recipe.loader import RecipeError, load_recipe

    entries = []
    root = recipes_root()
    for path in recipe_files():
        key = path.relative_to(root).with_suffix("").as_posix()
        try:
            r = load_recipe(path)
        except RecipeError as e:
            entries.append(Entry(key, path, error=str(e)))
            continue
        model = _shown(r.model.name_or_path) + (" (random init)" if r.model.init == "random" else "")
        entries.append(Entry(key, path, r.name, r.task, r.method.kind, model, r.description or "", r.output.dir))
    return entries


def find_recipe(name: str) -> Path:
    """A shipped recipe by key (``demo/full/cpt``, ``.yaml`` optional) or by its ``name:`` (``demo-cpt``)."""
    key = name[:-5] if name.endswith(".yaml") else name
    entries = catalog()
    for entry in entries:
        if key == entry.key or name == entry.name:
            return entry.path
    raise CatalogError(f"no shipped recipe {name!r}. Valid choices: {', '.join(e.key for e in entries)} "
                       "(see `affinage recipes list`; a recipe of your own is used by its path, no copy needed)")


def prerequisite(recipe: Path) -> Optional[Entry]:
    """The shipped recipe whose run this one starts from (``model: runs/demo-cpt/final``), if any."""
    entries = catalog()
    model = next((e.model for e in entries if e.path == recipe), "")
    return next((e for e in entries if e.output and model.startswith(e.output.rstrip("/") + "/")), None)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def needed_files(recipe: Path) -> list[Path]:
    """The recipe, its ``base:`` chain and every file or folder of the tree its resolved values name.

    The loader makes every relative path of a recipe absolute (relative to the file that wrote it),
    so any resolved value that lies inside the tree is something the recipe reads: data sources,
    eval sets, the model folder, a chat template, a DeepSpeed file. Licence and README files of the
    folders involved come along.
    """
    from affinage.recipe.loader import load_recipe_with_sources

    loaded = load_recipe_with_sources(recipe)
    found: set[Path] = {Path(os.path.abspath(f)) for f in loaded.files}
    for value in _strings(loaded.recipe.model_dump(mode="json")):
        if not os.path.isabs(value) or not _inside(value):
            continue
        path = Path(value)
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for folder in {p.parent for p in found}:
        for pattern in COMPANIONS:
            found.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(found)


@dataclass(frozen=True)
class Copied:
    recipe: Path  # the copied recipe file, to pass to train/plan/smoke/submit
    files: list[Path]  # every file written


def copy_recipe(name: str, dest: str | os.PathLike) -> Copied:
    """Copy the shipped recipe ``name`` and what it needs into ``dest``; refuse to overwrite anything."""
    source = find_recipe(name)
    root = recipes_root()
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise CatalogError(f"{dest} is a file: DEST must be a folder (it is created if missing)")
    pairs = [(src, dest / src.relative_to(root)) for src in needed_files(source)]
    existing = [target for _, target in pairs if target.exists() or target.is_symlink()]
    if existing:
        shown = ", ".join(str(t) for t in existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise CatalogError(f"recipes copy {name} {dest}: {len(existing)} file(s) already exist ({shown}); nothing was "
                           "copied. Choose another DEST, or remove those files first")
    for src, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)  # content only: the copy is the user's, writable, whatever the install's modes
    return Copied(dest / source.relative_to(root), [t for _, t in pairs])


def format_catalog(entries: list[Entry]) -> str:
    """The ``recipes list`` table: key, task, method, model, description (one line each)."""
    rows = [("RECIPE", "TASK", "METHOD", "MODEL", "DESCRIPTION")]
    for e in entries:
        text = e.description if e.error is None else "does not load: " + e.error.splitlines()[0]
        rows.append((e.key, e.task, e.method, e.model, text))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines.append("")
    lines.append("Copy one to read, edit and run it: affinage recipes copy RECIPE DEST, e.g.\n"
                 "  affinage recipes copy demo/full/cpt recipes && affinage train recipes/demo/full/cpt.yaml")
    return "\n".join(lines)
