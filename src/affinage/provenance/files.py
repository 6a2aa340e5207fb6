"""File entries of the manifest: path, size, mtime and sha256, reusing what is already known.

A 7B base is 15 GB: its hashes come from the Hugging Face cache's blob names or from the previous
manifest when size and mtime are unchanged, so regenerating a card does not re-read the weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from affinage.hashing import FileHasher

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

SCHEMA = "affinage.provenance/1"
PROVENANCE_FILE = "provenance.json"
SIDECAR_SUFFIXES = (".provenance.yaml", ".provenance.yml", ".provenance.json")
LANGUAGE_SAMPLE_RECORDS = 2000
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "trl", "accelerate", "datasets", "safetensors",
             "bitsandbytes", "deepspeed", "numpy", "pydantic", "lm_eval", "matplotlib")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_URL = re.compile(r"https?://[^\s\"'<>)]+")



class Hasher:
    """sha256 of files, reusing known hashes (previous manifest, HF cache blob names)."""

    def __init__(self, previous: Optional[dict] = None):
        self.known: dict[str, tuple[int, int, str]] = {}
        for entry in _walk_file_entries(previous or {}):
            if all(k in entry for k in ("path", "bytes", "mtime_ns", "sha256")) and entry["sha256"]:
                self.known[entry["path"]] = (entry["bytes"], entry["mtime_ns"], entry["sha256"])

    def file(self, path: Path) -> dict:
        path = Path(path)
        st = path.stat()
        key = str(path.absolute())
        entry = {"name": path.name, "path": key, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        target = path.resolve()
        if path.is_symlink() and _HEX64.match(target.name):
            entry.update(sha256=target.name, hash_from="Hugging Face cache blob name")
        elif key in self.known and self.known[key][:2] == (st.st_size, st.st_mtime_ns):
            entry.update(sha256=self.known[key][2], hash_from="previous manifest (same size and time)")
        else:
            entry.update(sha256=FileHasher().maybe(path), hash_from="computed")
        return entry

    def folder(self, folder: Path, skip: tuple[str, ...] = ()) -> list[dict]:
        return [self.file(p) for p in sorted(Path(folder).iterdir())
                if p.is_file() and not p.name.startswith(".") and p.name not in skip]


def _walk_file_entries(data: Any):
    if isinstance(data, dict):
        if "sha256" in data and "path" in data:
            yield data
        for v in data.values():
            yield from _walk_file_entries(v)
    elif isinstance(data, list):
        for v in data:
            yield from _walk_file_entries(v)
