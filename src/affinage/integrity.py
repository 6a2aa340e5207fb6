"""Folders that verify themselves: each file's size and a fast checksum, recorded when written, checked when read.

Checkpoints (``train.checkpoint``: in the ``COMPLETE`` marker) and the prepared-data cache
(``data.cache``: ``INTEGRITY.json``) record one :func:`manifest` when they are finished, and resume or a
cache hit calls :func:`verify` before trusting them: a truncated file, a flipped byte or a zeroed block
is caught instead of trained on. The checksum is xxh3-64 (from ``xxhash``, installed with ``datasets``;
several GB/s, so verifying costs about what reading the files costs); sha256 when xxhash is absent.
This is corruption detection, not security: anyone who can write the folder can rewrite the manifest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

try:
    import xxhash  # noqa: F401

    ALGORITHM = "xxh3_64"
except ImportError:  # pragma: no cover - xxhash comes with datasets
    ALGORITHM = "sha256"

_CHUNK = 8 << 20


def _hasher(algorithm: str):
    if algorithm == "xxh3_64":
        import xxhash

        return xxhash.xxh3_64()
    return hashlib.new(algorithm)


def digest(path: Path, algorithm: str = ALGORITHM) -> str:
    h = _hasher(algorithm)
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files(folder: Path, exclude: Iterable[str]) -> list[Path]:
    skip = set(exclude)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skip)


def manifest(folder: Path, exclude: Iterable[str] = ()) -> dict:
    """``{"algorithm", "files": {relative path: {"size", "digest"}}}`` for every file under ``folder``."""
    folder = Path(folder)
    files = {}
    for p in _files(folder, exclude):
        files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "digest": digest(p)}
    return {"algorithm": ALGORITHM, "files": files}


def verify(folder: Path, recorded: dict, sizes_only: bool = False) -> Optional[str]:
    """None when every recorded file is there with its size and checksum; else what is wrong (the first problem)."""
    folder = Path(folder)
    files = recorded.get("files")
    if not isinstance(files, dict):
        return "its manifest lists no files"
    algorithm = recorded.get("algorithm", ALGORITHM)
    for rel, want in files.items():  # sizes first: a truncated file is found without reading anything
        p = folder / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want.get("size"):
            return f"{rel} is {size:,} bytes, {want.get('size'):,} when written (truncated or overwritten)"
    if sizes_only:
        return None
    for rel, want in files.items():
        try:
            got = digest(folder / rel, algorithm)
        except OSError as e:
            return f"{rel} cannot be read ({e.strerror or e})"
        if got != want.get("digest"):
            return f"{rel} does not match its {algorithm} checksum (bytes changed on disk since it was written)"
    return None


def total_bytes(recorded: dict) -> int:
    return sum(int(f.get("size", 0)) for f in (recorded.get("files") or {}).values())

