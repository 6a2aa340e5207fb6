"""Find a model (or tokenizer) folder on disk, never on the network.

Compute nodes of clusters such as Jean Zay have no internet: a run that would try to download a
model hangs or fails late. So ``model.name_or_path`` is looked up, in order, as

1. a local folder (``~`` and ``$VARS`` expanded);
2. an entry of the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``), laid out ``models--org--name/snapshots/<commit>`` with
   ``refs/<revision>`` naming the commit — read directly, no ``huggingface_hub`` call that could
   reach the network. ``huggingface_hub.snapshot_download(local_files_only=True)`` finds the same
   folder (a test checks both agree) but answers a miss with one exception, where a user on a
   compute node needs to know *what* is missing (no refs/main, an incomplete snapshot, a revision
   that is not there); it also refuses a cache filled by commit with no ``refs/main``, which we
   accept when it holds a single snapshot;
3. each mirror folder of ``model.mirrors`` as ``<mirror>/<org>/<name>`` (Jean Zay's
   ``$DSDIR/HuggingFace_Models``); a mirror whose variable is unset is skipped, and said so.

When nothing matches, :class:`ModelNotFoundError` lists every place looked at and how to stage the
model from a node that has internet.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Literal, Optional

from affinage.model.errors import ModelFolderError, ModelNotFoundError
from affinage.paths import expand_str

Kind = Literal["model", "tokenizer"]

DEFAULT_MIRRORS: tuple[str, ...] = ("$DSDIR/HuggingFace_Models",)

#: files of which at least one makes a folder a tokenizer folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tekken.json")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_UNSET_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def hf_cache_dirs() -> list[tuple[Path, str]]:
    """The HF hub cache folder in use, with the setting it comes from (read now, not at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second is the legacy name
        if os.environ.get(var):
            return [(Path(os.environ[var]).expanduser(), f"${var}")]
    if os.environ.get("HF_HOME"):
        return [(Path(os.environ["HF_HOME"]).expanduser() / "hub", "$HF_HOME/hub")]
    return [(Path("~/.cache/huggingface/hub").expanduser(), "default ~/.cache/huggingface/hub")]


def _expand(text: str) -> tuple[str, list[str]]:
    """Expand ``~`` and ``$VARS``; also return the names of variables that are not set."""
    expanded = expand_str(text)
    missing = [m.group(1) for m in _UNSET_VAR.finditer(expanded) if m.group(1) not in os.environ]
    return expanded, missing


def _usable(folder: Path, kind: Kind) -> Optional[str]:
    """None when ``folder`` holds what ``kind`` needs, else why not."""
    if kind == "model":
        return None if (folder / "config.json").is_file() else "no config.json"
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    return "no tokenizer file (" + ", ".join(TOKENIZER_FILES) + ")"


def _check_found(folder: Path, kind: Kind, how: str) -> Path:
    why = _usable(folder, kind)
    if why is None:
        return folder.resolve()
    if kind == "model":
        raise ModelFolderError(
            f"{folder} ({how}) has {why}, so it is not a Hugging Face model folder. Give the folder that holds "
            "config.json and the weights (*.safetensors); if the model was only partly copied, stage it again "
            "from a node with internet: hf download ORG/NAME --local-dir FOLDER."
        )
    raise ModelFolderError(f"{folder} ({how}) has {why}, so no tokenizer can be loaded from it.")


def _from_hf_cache(repo_id: str, revision: Optional[str], kind: Kind, places: list[str]) -> Optional[Path]:
    for cache, origin in hf_cache_dirs():
        where = f"HF cache {cache} ({origin})"
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        if not repo.is_dir():
            places.append(f"{where}: no {repo.name}")
            continue
        snapshots = repo / "snapshots"
        rev = revision or "main"
        commit: Optional[str] = None
        if _COMMIT.match(rev) and (snapshots / rev).is_dir():
            commit = rev
        elif (repo / "refs" / rev).is_file():
            commit = (repo / "refs" / rev).read_text().strip()
        elif revision is None:
            # a cache filled with `snapshot_download(revision=<commit>)` has no refs/main: accept its
            # only snapshot, refuse to guess between several
            found = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
            if len(found) == 1:
                commit = found[0]
            else:
                places.append(
                    f"{where}: {repo.name} has no refs/main and {len(found)} snapshots "
                    f"({', '.join(found) or 'none'}); set model.revision to one of them"
                )
                continue
        else:
            refs = sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file()) \
                if (repo / "refs").is_dir() else []
            places.append(f"{where}: {repo.name} has no revision {rev!r} (refs: {', '.join(refs) or 'none'})")
            continue
        folder = snapshots / commit
        if not folder.is_dir():
            places.append(f"{where}: {repo.name} refs/{rev} names commit {commit} but snapshots/{commit} is missing")
            continue
        why = _usable(folder, kind)
        if why is not None:
            places.append(f"{where}: {folder} has {why} (incomplete download?)")
            continue
        return folder.resolve()
    return None


def _from_mirrors(repo_id: str, mirrors: Iterable[str], kind: Kind, places: list[str]) -> Optional[Path]:
    for mirror in mirrors:
        expanded, missing = _expand(mirror)
        if missing:
            places.append(f"mirror {mirror}: skipped, " + ", ".join(f"${v}" for v in missing) + " not set")
            continue
        folder = Path(expanded) / repo_id
        if not folder.is_dir():
            places.append(f"mirror {mirror}: {folder} does not exist")
            continue
        why = _usable(folder, kind)
        if why is not None:
            places.append(f"mirror {mirror}: {folder} has {why}")
            continue
        return folder.resolve()
    return None


def staging_hint(name: str) -> str:
    """How to put a model where this resolver finds it, from a node with internet."""
    return (
        "To stage it for offline use, on a node with internet (on Jean Zay: a login or prepost node), run\n"
        f"    hf download {name} --local-dir $WORK/models/{name}\n"
        f"(older huggingface_hub: huggingface-cli download {name} --local-dir $WORK/models/{name}),\n"
        f"then set `model.name_or_path: $WORK/models/{name}` in the recipe, or add `$WORK/models` to `model.mirrors`."
    )


#: folders already resolved in this process: plan, prepare, load, provenance and eval of one run ask
#: the same question, and on a cluster the HF cache and mirrors sit on a slow shared file system
_RESOLVED: dict[tuple, Path] = {}


def forget_resolved() -> None:
    """Forget the folders resolved so far (a notebook or test that restages a model mid-process)."""
    _RESOLVED.clear()


def resolve_model_path(
    name_or_path: str | os.PathLike,
    revision: Optional[str] = None,
    mirrors: Iterable[str] = DEFAULT_MIRRORS,
    kind: Kind = "model",
) -> Path:
    """The local folder holding ``name_or_path``; raises :class:`ModelNotFoundError` with every place looked at.

    ``revision`` (branch, tag or commit) applies to the HF cache only: local folders and mirrors
    hold one version. ``kind="tokenizer"`` accepts a folder with tokenizer files but no config.json.
    Resolved once per process for the same question (name, revision, mirrors and the settings they
    expand to, current folder); a remembered folder that has gone is looked up again.
    """
    mirrors = tuple(mirrors)
    key = (expand_str(os.fspath(name_or_path)), revision, tuple(expand_str(m) for m in mirrors), kind,
           tuple(str(c) for c, _ in hf_cache_dirs()), os.getcwd())
    found = _RESOLVED.get(key)
    if found is None or not found.is_dir():
        found = _RESOLVED[key] = _resolve(name_or_path, revision, mirrors, kind)
    return found


def _resolve(name_or_path: str | os.PathLike, revision: Optional[str], mirrors: Iterable[str], kind: Kind) -> Path:
    if kind not in ("model", "tokenizer"):
        raise ValueError(f"kind must be 'model' or 'tokenizer' (got {kind!r})")
    raw = os.fspath(name_or_path)
    expanded, missing = _expand(raw)
    places: list[str] = []

    local = Path(expanded)
    if local.is_dir():
        return _check_found(local, kind, "local folder")
    if local.exists():
        raise ModelFolderError(f"{local} is a file; model.name_or_path must be a folder or a Hugging Face id (org/name)")
    places.append(
        f"local folder {local.absolute()}: does not exist"
        + (f" ({', '.join('$' + v for v in missing)} not set)" if missing else "")
    )

    repo_id = raw.strip().strip("/")
    is_repo_id = bool(_REPO_ID.match(repo_id)) and ".." not in repo_id and not missing
    if is_repo_id:
        found = _from_hf_cache(repo_id, revision, kind, places)
        if found is None:
            found = _from_mirrors(repo_id, mirrors, kind, places)
        if found is not None:
            return found
    else:
        places.append(f"{raw!r} is not a Hugging Face id (org/name), so the HF cache and mirrors were not searched")

    what = "Tokenizer" if kind == "tokenizer" else "Model"
    message = (
        f"{what} {raw!r}" + (f" (revision {revision!r})" if revision else "") + " was not found offline "
        "(no download is attempted: compute nodes have no internet). Looked at:\n"
        + "\n".join(f"  - {p}" for p in places)
        + "\n"
        + staging_hint(repo_id if is_repo_id else "ORG/NAME")
    )
    raise ModelNotFoundError(message, places)
