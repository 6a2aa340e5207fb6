"""The one hasher of files, folders and text: cache keys, manifests, checkpoints and eval sets use it.

sha256 everywhere, so a digest printed in a manifest can be checked with ``sha256sum``. Files are
streamed in 1 MiB blocks (flat memory on multi-GB weights); :class:`FileHasher` remembers digests by
(real path, size, mtime_ns) so an unchanged recipe hashes nothing twice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from affinage.errors import UserError

BLOCK = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
MEMO_FILE = "file-hashes.json"


def sha256_file(path: Path) -> str:
    """sha256 of one file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def int_hash(text: str) -> int:
    """A stable 64-bit integer of ``text`` (Python's ``hash()`` changes between processes)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: equal data gives equal text, hence equal digests."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))


def sha256_json(obj: Any) -> str:
    return sha256_text(canonical_json(obj))


def _is_hidden(rel: str) -> bool:
    return rel.startswith(".") or "/." in rel


class FileHasher:
    """sha256 of files and folders, optionally remembered in ``<root>/file-hashes.json``.

    An unchanged file is not read again; a file rewritten in place (new mtime or size) is. A folder
    hashes to the digest of its files' relative paths and digests (hidden files skipped, weights
    skipped when asked).
    """

    def __init__(self, root: Optional[Path] = None):
        self.root = root
        self.path = Path(root) / MEMO_FILE if root else None
        self.known: dict[str, str] = {}
        self.dirty = False
        if self.path and self.path.is_file():
            try:
                self.known = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.known = {}

    def file(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        memo = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        digest = self.known.get(memo)
        if digest is None:
            digest = sha256_file(path)
            self.known[memo] = digest
            self.dirty = True
        return digest

    def tree(self, path: Path, skip_weights: bool = False) -> str:
        path = Path(path)
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            raise UserError(f"cannot hash {path}: no such file or folder")
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            rel = p.relative_to(path).as_posix()
            if _is_hidden(rel) or (skip_weights and p.suffix.lower() in WEIGHT_SUFFIXES):
                continue
            h.update(rel.encode() + b"\0" + self.file(p).encode() + b"\n")
        return h.hexdigest()

    def maybe(self, path: Path) -> Optional[str]:
        """Digest of a file or folder, or None when it does not exist."""
        path = Path(path)
        return self.tree(path) if path.exists() else None

    def save(self) -> None:
        if not (self.dirty and self.path):
            return
        from affinage.run import atomic_write_json

        # keep the memo small: entries of files that no longer exist go
        alive = {k: v for k, v in self.known.items() if Path(k.split("|", 1)[0]).exists()}
        try:
            atomic_write_json(self.path, alive)
        except OSError:
            pass  # a read-only cache root still works, only slower
        self.dirty = False
