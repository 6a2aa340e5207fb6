"""A model folder checked before transformers loads it: one clear error instead of a traceback.

What a user really has after a broken download or copy: a ``config.json`` that is not JSON, without a
``model_type`` or with one this transformers does not know, a negative or zero dimension, no weights
file, a truncated or garbage ``.safetensors`` (its header says how long every tensor is, so a short
file is caught by its size alone), a shard named by the index that is missing, a vocabulary smaller
than the tokenizer's. Each error names the folder, the file and how to stage the model again. Only
headers are read (milliseconds, whatever the model's size); a flipped byte inside a tensor of a model
folder is not detected (HF folders carry no checksums; checkpoints do, see ``train.checkpoint``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

from affinage.model.errors import ModelFolderError

# Dimensions a causal LM config must have positive (when present); any other *_size or num_* key must not be negative.
_POSITIVE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "max_position_embeddings", "head_dim", "n_embd", "n_layer", "n_head", "n_positions")
_MAX_HEADER = 100 << 20  # a safetensors header is a few hundred KB even for 70B models


def _restage(folder: Path, name: Optional[str]) -> str:
    from affinage.model.resolve import staging_hint

    who = name if name and "/" in name and not name.startswith((".", "/", "$", "~")) else "ORG/NAME"
    return ("The folder is damaged or incomplete (a broken download or copy?): stage it again. "
            + staging_hint(who).replace("To stage it for offline use", "To stage it again"))


def _fail(folder: Path, file: str, why: str, name: Optional[str]) -> ModelFolderError:
    return ModelFolderError(f"model folder {folder}: {file}: {why}. {_restage(folder, name)}")


def read_config(folder: Path, name: Optional[str] = None, trust_remote_code: bool = False) -> dict:
    """``config.json`` as a dict, checked: JSON, a known ``model_type``, no negative or zero dimension."""
    path = folder / "config.json"
    if not path.is_file():
        raise _fail(folder, "config.json", "missing (every transformers model folder has one)", name)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeError:
        raise _fail(folder, "config.json", "not text (binary or garbage content)", name) from None
    except json.JSONDecodeError as e:
        raise _fail(folder, f"config.json:{e.lineno}", f"not valid JSON ({e.msg}, column {e.colno})", name) from None
    if not isinstance(config, dict):
        raise _fail(folder, "config.json", f"holds a {type(config).__name__}, not a JSON object", name)
    model_type = config.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise _fail(folder, "config.json", "no model_type (e.g. \"model_type\": \"llama\"): transformers cannot tell the architecture", name)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING and not config.get("auto_map"):  # auto_map: the folder's own code (load.py asks for trust)
        import difflib

        import transformers

        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelFolderError(f"model folder {folder}: config.json: unknown model_type {model_type!r} for transformers "
                               f"{transformers.__version__}.{hint} If the folder is from a newer library, upgrade "
                               f"transformers; otherwise the file is damaged. {_restage(folder, name)}")
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if (key in _POSITIVE and value <= 0) or (value < 0 and (key.endswith("_size") or key.startswith("num_"))):
            raise _fail(folder, "config.json", f"{key} is {value}; a model dimension must be positive", name)
    return config


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_tokenizer_files(folder: Path, name: Optional[str] = None) -> None:
    """The tokenizer's JSON files, when present, are readable JSON objects."""
    for file in TOKENIZER_JSON_FILES:
        path = Path(folder) / file
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeError:
            raise _fail(Path(folder), file, "not text (binary or garbage content)", name) from None
        except json.JSONDecodeError as e:
            raise _fail(Path(folder), f"{file}:{e.lineno}", f"not valid JSON ({e.msg}, column {e.colno})", name) from None
        if not isinstance(data, dict):
            raise _fail(Path(folder), file, f"holds a {type(data).__name__}, not a JSON object", name)


def tokenizer_load_error(folder: Path, exc: BaseException, name: Optional[str] = None) -> ModelFolderError:
    """What transformers/tokenizers raised on a folder whose files parse but do not make a tokenizer."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return ModelFolderError(f"model folder {folder}: the tokenizer files cannot be loaded ({type(exc).__name__}: {first}). "
                            + _restage(Path(folder), name))


def _check_safetensors(folder: Path, file: Path, name: Optional[str]) -> None:
    rel = file.name
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _fail(folder, rel, f"{size} bytes: too short for a safetensors file (truncated)", name)
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise _fail(folder, rel, f"not a safetensors file, or truncated (header length {n:,} for a {size:,}-byte file)", name)
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (UnicodeError, ValueError, KeyError, TypeError, IndexError):
        raise _fail(folder, rel, "its safetensors header is not readable (garbage content)", name) from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise _fail(folder, rel, f"{what}: {size:,} bytes on disk, {expected:,} expected from its header", name)
    from safetensors import safe_open

    try:  # the library's own reading of the header (dtypes, shapes against offsets)
        with safe_open(str(file), "pt") as f:
            list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError (and others) for a bad header
        raise _fail(folder, rel, f"safetensors cannot read it ({str(e).splitlines()[0][:200]})", name) from None


def check_weights(folder: Path, name: Optional[str] = None) -> list[Path]:
    """The folder's weight files, every one checked against its header; refuses a folder without any."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (UnicodeError, ValueError, KeyError, TypeError, AttributeError):
                raise _fail(folder, index_name, "not a readable weight index (JSON with a weight_map)", name) from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise _fail(folder, missing[0], f"named by {index_name} but missing ({len(missing)} of {len(shards)} shards missing)", name)
            files = [folder / s for s in shards]
            break
    else:
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise _fail(folder, "model.safetensors", "no weights file (model.safetensors, its shards, or pytorch_model.bin); "
                    "model.init: random builds the architecture without weights, if that is what you want", name)
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(folder, f, name)
        else:
            with open(f, "rb") as fh:
                magic = fh.read(4)
            if magic[:2] != b"PK":  # torch.save writes a zip archive
                raise _fail(folder, f.name, "not a PyTorch zip archive (truncated or garbage)", name)
    return files


def check_model_folder(folder: Path, *, name: Optional[str] = None, weights: bool = True,
                       trust_remote_code: bool = False) -> dict:
    """Check ``folder`` before loading: config (always), weights when ``weights``; returns config.json's dict."""
    folder = Path(folder)
    config = read_config(folder, name, trust_remote_code)
    if weights:
        check_weights(folder, name)
    return config


def check_vocab(config_vocab: Optional[int], tokenizer, folder: Path, name: Optional[str] = None) -> None:
    """The embedding must cover every token id the tokenizer can produce."""
    if config_vocab is None:
        return
    n = len(tokenizer)
    if n > config_vocab:
        raise ModelFolderError(
            f"model folder {folder}: config.json: vocab_size {config_vocab:,} is smaller than the tokenizer's "
            f"{n:,} tokens: token ids past {config_vocab - 1} have no embedding. The tokenizer does not belong to "
            "this model (model.tokenizer?), or config.json is damaged. " + _restage(folder, name))


def check_recipe_model(recipe, tokenizer=None) -> Path:
    """The recipe's model folder checked as training will use it (weights unless model.init: random; vocab)."""
    from affinage.model.resolve import resolve_model_path

    spec = recipe.model
    folder = resolve_model_path(spec.name_or_path, revision=spec.revision, mirrors=spec.mirrors)
    config = check_model_folder(folder, name=spec.name_or_path, weights=spec.init == "pretrained",
                                trust_remote_code=spec.trust_remote_code)
    if tokenizer is not None:
        check_vocab(config.get("vocab_size"), tokenizer, folder, spec.name_or_path)
    return folder
