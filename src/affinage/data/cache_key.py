"""What the prepared data depends on: the inputs hashed into the cache key (``cache.key_of``).

Every input is covered (source contents, the tokenizer's files, the chat template, the data
settings, decontamination files), so an unchanged recipe finds its folder in well under a second
and any change builds a new one. How the data is built (``num_proc``, ``cache_dir``) is not in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from affinage.data.cache import DATA_FORMAT_VERSION, tokenizer_fingerprint
from affinage.data.errors import DataError
from affinage.data.mixture import source_names
from affinage.data.readers import read_source, source_path
from affinage.hashing import FileHasher, sha256_text
from affinage.paths import expand


def _tokenizer_folder(recipe) -> Optional[Path]:
    from affinage.model.resolve import resolve_model_path

    spec = recipe.model
    source = spec.tokenizer or spec.name_or_path
    try:
        return resolve_model_path(source, revision=spec.revision if spec.tokenizer is None else None, mirrors=spec.mirrors, kind="tokenizer")
    except Exception:
        return None


def _template_identity(recipe, hasher: FileHasher) -> Optional[str]:
    from affinage.data.templates import NAMED_TEMPLATES

    name = recipe.model.chat_template
    if not name or recipe.task == "cpt":  # sft, dpo and kto render chat templates
        return None
    if name in NAMED_TEMPLATES:
        return "named:" + name + ":" + sha256_text(NAMED_TEMPLATES[name])
    path = expand(name)
    return "file:" + (hasher.file(path) if path.is_file() else f"missing:{name}")


def cache_key_inputs(recipe, tokenizer=None, hasher: Optional[FileHasher] = None) -> dict:
    """Everything the prepared data depends on, as a JSON-able dict (its hash is the cache key).

    The tokenizer is identified by the files of its folder when the recipe's tokenizer resolves
    to one (no need to load it), else by ``tokenizer`` itself (its JSON, special ids and template).
    """
    hasher = hasher or FileHasher(None)
    data = recipe.data
    sources = []
    for spec, name in zip(data.sources, source_names(data.sources)):
        path = source_path(spec)
        if not path.exists():
            read_source(spec).__next__()  # raises the reader's "not found, did you mean" DataError
        d = spec.model_dump(mode="json")
        d["name"] = name
        d["content_sha256"] = hasher.tree(path)
        sources.append(d)
    folder = _tokenizer_folder(recipe)
    if folder is not None:
        tok_id = {"folder_sha256": hasher.tree(folder, skip_weights=True)}
    elif tokenizer is not None:
        # a template named in the recipe is keyed by chat_template below (and gets set on the object)
        tok_id = {"object_sha256": tokenizer_fingerprint(tokenizer, with_template=not recipe.model.chat_template)}
    else:
        raise DataError(f"cannot find the tokenizer of {recipe.model.tokenizer or recipe.model.name_or_path} to key the data cache")
    decon = None
    if data.decontamination is not None:
        decon = data.decontamination.model_dump(mode="json")
        decon["eval_sha256"] = [hasher.tree(expand(f)) for f in data.decontamination.eval_files]
    settings = data.model_dump(mode="json", exclude={"sources", "cache_dir", "num_proc", "decontamination"})
    return {
        "format_version": DATA_FORMAT_VERSION,
        "task": recipe.task,
        "seed": recipe.seed,
        "sources": sources,
        "tokenizer": tok_id,
        "chat_template": _template_identity(recipe, hasher),
        "data": settings,
        "decontamination": decon,
    }
