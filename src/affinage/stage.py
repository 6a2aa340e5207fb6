"""`affinage stage RECIPE --to DIR`: everything a recipe reads, gathered where compute nodes find it.

Compute nodes have no network; what is not staged fails at 3 a.m. after hours in the queue. Run this
on a node that has the network (Jean Zay: a login or prepost node). It copies the model and
tokenizer (from a local folder, a mirror or the HF cache; ``--download`` fetches a missing one
through ``huggingface_hub``), the data sources, evaluation sets, lm-eval task folders, the chat
template and the distributed config into ``DIR``, writes ``DIR/manifest.json`` (size and sha256 of
every file) and ``DIR/recipe.yaml``: the resolved recipe with every path pointing into ``DIR``.

Re-running checks the manifest: a file whose copy still has the recorded size and digest, and whose
source has not changed, is not copied again. ``affinage check-offline DIR/recipe.yaml`` then proves
that nothing else is needed (:mod:`affinage.offline`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from affinage.errors import UserError
from affinage.hashing import FileHasher
from affinage.paths import expand
from affinage.run import atomic_write_json

MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"


class StageError(UserError):
    """Something the recipe needs cannot be staged; the message says what and how to fix it."""


@dataclass
class Item:
    key: str  # the recipe key, e.g. data.sources.0.path
    source: Path
    dest: str  # relative to DIR


@dataclass
class StageResult:
    root: Path
    recipe: Path
    manifest: Path
    items: list[Item]
    copied: list[str] = field(default_factory=list)  # files copied this time (relative to DIR)
    kept: list[str] = field(default_factory=list)  # files already there, checked against the manifest
    bytes_total: int = 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "item"


def _model_slug(name: str) -> str:
    """``org--name`` for a hub id, the folder's own name for a path."""
    if name.startswith(("/", ".", "$", "~")) or Path(expand(name)).exists():
        return _slug(Path(expand(name)).name)
    return _slug(name.replace("/", "--"))


def _model_folder(name: str, revision: Optional[str], mirrors, kind: str, download: bool, to: Path) -> Path:
    from affinage.model.errors import ModelNotFoundError
    from affinage.model.resolve import resolve_model_path

    try:
        return resolve_model_path(name, revision=revision, mirrors=mirrors, kind=kind)
    except ModelNotFoundError as e:
        if not download:
            raise StageError(f"{kind} {name!r} is not on this machine: {e}\nOr rerun `affinage stage` with --download "
                             "on a node with internet.") from None
    return download_model(name, revision, to / "downloads" / _slug(name))


def download_model(repo_id: str, revision: Optional[str], local_dir: Path) -> Path:
    """Fetch ``repo_id`` through ``huggingface_hub`` (needs the network); a clear error without it."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise StageError("--download needs huggingface_hub (pip install huggingface_hub)") from None
    url = f"{constants.ENDPOINT}/{repo_id}"
    previous = os.environ.pop("HF_HUB_OFFLINE", None)  # affinage's CLI sets it by default: this one call may go out
    try:
        import huggingface_hub.constants as c

        saved, c.HF_HUB_OFFLINE = c.HF_HUB_OFFLINE, False
        try:
            path = snapshot_download(repo_id, revision=revision, local_dir=str(local_dir))
        finally:
            c.HF_HUB_OFFLINE = saved
    except Exception as e:  # network, authentication, unknown repository: all say the same to the user
        raise StageError(
            f"could not download {repo_id} from {url}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Run `affinage stage --download` on a node with internet (Jean Zay: a login or prepost node), "
            "or stage the model by hand (hf download) and name its folder in model.name_or_path"
        ) from None
    finally:
        if previous is not None:
            os.environ["HF_HUB_OFFLINE"] = previous
    return Path(path)


def collect(recipe, to: Path, download: bool = False) -> list[Item]:
    """What the recipe reads, with where each copy goes inside ``to``."""
    items: list[Item] = []
    m = recipe.model

    def add(key: str, value: Optional[str], dest: str, must_exist: bool = True) -> None:
        if not value:
            return
        path = expand(value)
        if not path.exists():
            if must_exist:
                raise StageError(f"{key}: {path} does not exist; fix the recipe or create it before staging")
            return
        items.append(Item(key, path.resolve(), dest))

    model = _model_folder(m.name_or_path, m.revision, m.mirrors, "model", download, to)
    items.append(Item("model.name_or_path", model, f"models/{_model_slug(m.name_or_path)}"))
    if m.tokenizer:
        tok = _model_folder(m.tokenizer, m.revision, m.mirrors, "tokenizer", download, to)
        items.append(Item("model.tokenizer", tok, f"models/{_model_slug(m.tokenizer)}-tokenizer"))
    if m.chat_template and m.chat_template.endswith(".jinja"):
        add("model.chat_template", m.chat_template, f"templates/{Path(m.chat_template).name}")
    for i, s in enumerate(recipe.data.sources):
        add(f"data.sources.{i}.path", s.path, f"data/{i}/{Path(s.path).name}")
    if recipe.distributed.config:
        add("distributed.config", recipe.distributed.config, f"distributed/{Path(recipe.distributed.config).name}")
    ev = recipe.eval
    if ev is not None:
        for i, s in enumerate(ev.perplexity):
            add(f"eval.perplexity.{i}.path", s.path, f"eval/perplexity-{i}/{Path(s.path).name}")
        for i, s in enumerate(ev.mcq):
            add(f"eval.mcq.{i}.path", s.path, f"eval/mcq-{i}/{Path(s.path).name}")
            add(f"eval.mcq.{i}.fewshot_path", s.fewshot_path, f"eval/mcq-{i}-fewshot/{Path(s.fewshot_path or 'x').name}")
        if ev.generation is not None:
            add("eval.generation.path", ev.generation.path, f"eval/prompts/{Path(ev.generation.path or 'x').name}")
        if ev.lm_eval is not None:
            add("eval.lm_eval.include_path", ev.lm_eval.include_path, "eval/lm_eval_tasks")
        if ev.base and ev.base != m.name_or_path:
            base = _model_folder(ev.base, None, m.mirrors, "model", download, to)
            items.append(Item("eval.base", base, f"models/{_model_slug(ev.base)}-base"))
    return items


def _files(source: Path) -> list[tuple[Path, str]]:
    """(file, path relative to the item) for a file or a folder (hidden files and caches skipped)."""
    if source.is_file():
        return [(source, "")]
    out = []
    for p in sorted(source.rglob("*")):
        rel = p.relative_to(source).as_posix()
        if rel.startswith(".") or "/." in rel or "__pycache__" in rel:
            continue
        if p.is_file():  # follows symlinks: HF cache snapshots link to blobs
            out.append((p, rel))
    return out


def _set_key(data: dict, key: str, value: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value


def stage(recipe_path, to, *, overrides: Sequence[str] = (), download: bool = False) -> StageResult:
    """Copy what ``recipe_path`` reads into ``to``; see the module docstring."""
    from affinage.recipe.loader import dump_resolved, load_recipe

    root = Path(os.path.abspath(expand(to)))
    root.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(recipe_path, overrides=overrides)
    items = collect(recipe, root, download=download)
    manifest_path = root / MANIFEST
    try:
        old = {f["path"]: f for f in json.loads(manifest_path.read_text(encoding="utf-8")).get("files", [])}
    except (OSError, ValueError):
        old = {}
    hasher = FileHasher(root)
    result = StageResult(root=root, recipe=root / RECIPE, manifest=manifest_path, items=items)
    files = []
    for item in items:
        for src, rel in _files(item.source):
            dest_rel = f"{item.dest}/{rel}" if rel else item.dest
            dest = root / dest_rel
            st = src.stat()
            if dest.exists() and dest.resolve() == src.resolve():  # a staged recipe staged again
                result.kept.append(dest_rel)
                files.append(old.get(dest_rel) or {"path": dest_rel, "size": st.st_size, "sha256": hasher.file(dest), "key": item.key,
                                                   "source": str(src), "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns})
                continue
            known = old.get(dest_rel)
            same_source = known and known.get("source_size") == st.st_size and known.get("source_mtime_ns") == st.st_mtime_ns
            if same_source and dest.is_file() and dest.stat().st_size == known["size"] and hasher.file(dest) == known["sha256"]:
                result.kept.append(dest_rel)
                files.append(known)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.staging")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
            result.copied.append(dest_rel)
            files.append({"path": dest_rel, "size": dest.stat().st_size, "sha256": hasher.file(dest), "key": item.key,
                          "source": str(src), "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns})
    hasher.save()
    result.bytes_total = sum(f["size"] for f in files)

    from affinage.recipe.schema import Recipe

    data = recipe.model_dump(mode="json")
    for item in items:
        _set_key(data, item.key, str(root / item.dest))
    data["model"]["mirrors"] = []  # the staged folder is the one place to look
    staged = Recipe.model_validate(data)
    text = f"# Staged by `affinage stage` into {root}: every file this recipe reads is under it.\n" + dump_resolved(staged)
    from affinage.run import atomic_write_text

    atomic_write_text(result.recipe, text)
    atomic_write_json(manifest_path, {
        "recipe": str(Path(recipe_path).resolve()),
        "staged_recipe": str(result.recipe),
        "items": [{"key": i.key, "source": str(i.source), "dest": i.dest} for i in items],
        "files": files,
        "bytes": result.bytes_total,
    })
    return result


def format_stage(result: StageResult) -> str:
    lines = [f"staged into     {result.root}"]
    for item in result.items:
        lines.append(f"  {item.key:<28} {item.source} → {item.dest}")
    lines += [
        f"files           {len(result.copied)} copied, {len(result.kept)} already there (checked against the manifest)",
        f"size            {result.bytes_total / 1e6:,.1f} MB",
        f"manifest        {result.manifest}",
        f"recipe          {result.recipe}",
        f"next            affinage check-offline {result.recipe}",
    ]
    return "\n".join(lines)
