"""What a run trains, so that a resume continues the same run or says why it cannot.

The identity is a sha256 over the resolved recipe's training-relevant fields (every field except
``affinage.recipe.schema.RESUMABLE_FIELDS``), the content hash of the model folder and the key of
the prepared-data cache. It is written to ``RUN_DIR/identity.json`` when a run starts; a resume
compares field by field and refuses a difference unless ``--allow-change KEY`` names it, in which
case the change is recorded there (and in the provenance) with the step it took effect at.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from affinage.errors import UserError
from affinage.recipe.schema import RESUMABLE_FIELDS, Recipe
from affinage.run import RunDir, write_json

SCHEMA = "affinage.identity/1"


class RunChangedError(UserError):
    """A resume whose recipe, model or data differ from what the run directory trained."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"training.learning_rate": 1e-4, "data.sources[0].path": ...}``: one entry per leaf."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, list) and data and any(isinstance(v, (dict, list)) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = data
    return out


def _under(path: str, key: str) -> bool:
    return path == key or path.startswith(key + ".") or path.startswith(key + "[")


def is_resumable(path: str) -> bool:
    return any(_under(path, key) for key in RESUMABLE_FIELDS)


def identity_fields(recipe: Recipe, *, model_sha256: Optional[str], data_key: Optional[str]) -> dict[str, Any]:
    """The flat training-relevant fields of ``recipe``, plus the model files' and data's hashes."""
    data = recipe.model_dump(mode="json")
    data["training"]["duration"] = str(recipe.training.duration)
    fields = {k: v for k, v in flatten(data).items() if not is_resumable(k)}
    fields["model.files_sha256"] = model_sha256
    fields["data.cache_key"] = data_key
    return dict(sorted(fields.items()))


def digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def model_files_sha256(recipe: Recipe, hasher) -> Optional[str]:
    """Content hash of the model folder (weights included; ``hasher`` remembers files by size and
    mtime, so a 15 GB model is read once per machine, not once per start)."""
    from affinage.model.resolve import resolve_model_path

    spec = recipe.model
    try:
        folder = resolve_model_path(spec.name_or_path, revision=spec.revision, mirrors=spec.mirrors)
    except UserError:
        return None
    return hasher.tree(folder)


def current_identity(recipe: Recipe, data_cache_path: Path) -> dict:
    """``{"identity": sha256, "fields": {...}}`` for ``recipe`` trained on the prepared cache at ``data_cache_path``."""
    from affinage.hashing import FileHasher

    root = Path(data_cache_path).parent
    hasher = FileHasher(root)
    fields = identity_fields(recipe, model_sha256=model_files_sha256(recipe, hasher), data_key=Path(data_cache_path).name)
    hasher.save()
    return {"identity": digest(fields), "fields": fields}


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(run: RunDir, current: dict, *, step: int, allow: Iterable[str] = (), fresh_hint: str = "") -> list[dict]:
    """Compare ``current`` with ``run``'s identity before resuming at ``step``.

    Returns the allowed changes (recorded by :func:`record`); raises :class:`RunChangedError`
    listing every other difference and the two ways out.
    """
    stored = run.read_identity()
    if stored is None or "fields" not in stored:
        return []  # a run directory written before identities existed: nothing to compare with
    allow = list(allow)
    changed = differences(stored["fields"], current["fields"])
    refused = [(k, a, b) for k, a, b in changed if not any(_under(k, key) for key in allow)]
    if refused:
        listing = "; ".join(f"{k}: {_short(a)} → {_short(b)}" for k, a, b in refused)
        keys = " ".join(f"--allow-change {k}" for k, _, _ in refused)
        raise RunChangedError(
            f"{run.root} holds a run of another recipe: resuming it at step {step} with these changes would describe a "
            f"run that never happened ({listing}). Either start a new run: add --run-dir NEW_DIR (or --fresh to "
            f"discard this run's checkpoints{fresh_hint}); or continue this run with the change recorded in its "
            f"provenance: {keys}"
        )
    return [{"step": step, "key": k, "from": a, "to": b, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")} for k, a, b in changed]


def record(run: RunDir, current: dict, *, changes: list[dict] = (), restart: bool = False) -> dict:
    """Write ``identity.json``: the current identity, and the history of allowed changes (kept
    across resumes, cleared when the run starts over)."""
    stored = None if restart else run.read_identity()
    history = list((stored or {}).get("changes", [])) + list(changes)
    doc = {"schema": SCHEMA, "identity": current["identity"], "first_identity": (stored or {}).get("first_identity", current["identity"]),
           "fields": current["fields"], "changes": history}
    write_json(run.identity, doc)
    return doc
