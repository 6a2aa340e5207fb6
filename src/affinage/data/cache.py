"""The prepared-data cache: where it lives, what its key covers, how it is written and read.

``affinage prepare`` (and ``train`` on a cache miss) writes one folder per key::

    <cache root>/<key>/
      meta.json        format version, the key's inputs, counts
      stats.json       per-source statistics (also copied to the run's data_stats.json)
      train/  heldout/ flat arrays, memory-mapped when read:
        input_ids.npy    uint32 [tokens]     every row's tokens, rows one after the other
        loss_mask.npy    uint8  [tokens]     1 where the token is a prediction target (label = token)
        seq_offsets.npy  int64  [segments+1] start of each segment (a sample or document piece): cu_seqlens
        row_seq.npy      int64  [rows+1]     row r holds segments row_seq[r] .. row_seq[r+1]-1

A segment is attended to only by itself (positions restart at 0); the first token of every segment
carries no loss, so a row predicts exactly what its samples predict alone. The folder is built in a
temporary sibling and renamed, so it is complete or absent.

The key is a sha256 over: the data-format version, each source file's content hash (sha256, streamed,
remembered by path, size and mtime so an unchanged recipe hashes nothing), the tokenizer's files, the
chat template, the task, seed, max_length, packing, filters, decontamination files, held-out and
weight settings. Any change gives a new key, hence a new folder; old folders stay until removed.

Integrity: :func:`publish` records every file's size and checksum in ``INTEGRITY.json``
(``affinage.integrity``); :meth:`PreparedCache.open` verifies them on every hit, so flipped or zeroed
bytes in token ids, loss masks or row boundaries are never trained on: a corrupt folder is removed
with a message and the next run rebuilds it. Temporary folders left by a killed ``prepare`` are removed
by the next builder (they are recognised by a free build lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from affinage.data.errors import DataError
from affinage.hashing import sha256_json
from affinage.paths import expand

DATA_FORMAT_VERSION = 1
ARRAYS = {"input_ids": np.uint32, "loss_mask": np.uint8, "seq_offsets": np.int64, "row_seq": np.int64}
INTEGRITY = "INTEGRITY.json"


class CorruptCacheError(DataError):
    """A prepared-data folder whose files no longer match what was written."""


# ------------------------------------------------------------------------------------ location
def cache_root(data_spec=None) -> Path:
    """``data.cache_dir``, else ``$AFFINAGE_CACHE``, else ``~/.cache/affinage`` (env vars and ~ expanded)."""
    raw = getattr(data_spec, "cache_dir", None) or os.environ.get("AFFINAGE_CACHE") or "~/.cache/affinage"
    return expand(raw).resolve()


def tokenizer_fingerprint(tokenizer, with_template: bool = True) -> str:
    """sha256 of what decides token ids: the backend's JSON, special tokens and (optionally) the chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        h.update(f"{name}={getattr(tokenizer, name, None)}\n".encode())
    if with_template:
        h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def key_of(inputs: dict) -> str:
    return sha256_json(inputs)[:32]


# -------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def build_lock(root: Path, key: str, timeout: float = 6 * 3600) -> Iterator[None]:
    """One builder per key: other processes (torchrun ranks, a second job) wait, then find the cache."""
    root.mkdir(parents=True, exist_ok=True)
    lock = root / f".{key}.lock"
    fh = open(lock, "a+")
    try:
        try:
            import fcntl

            deadline = time.time() + timeout
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.time() > deadline:
                        raise DataError(f"timed out waiting for another process building the data cache {root / key}")
                    time.sleep(0.5)
        except ImportError:  # no fcntl (Windows): rely on the atomic rename alone
            pass
        import socket

        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        fh.flush()
        remove_orphans(root, own_key=key)
        yield
    finally:
        fh.close()


def remove_orphans(root: Path, own_key: Optional[str] = None, stale_after: float = 6 * 3600) -> list[Path]:
    """Delete temporary build folders (``.<key>.<random>/``) whose key nobody is building (a killed prepare's).

    ``own_key``'s are orphans for sure (its lock is held by the caller). Another key's folder goes when its
    lock is free and it was left by this host, or is older than ``stale_after`` seconds (another host's
    lock may not be visible here on every network file system).
    """
    import socket

    removed = []
    try:
        import fcntl
    except ImportError:
        return removed
    for tmp in root.glob(".*.*"):
        key = tmp.name[1:].split(".", 1)[0]
        if not tmp.is_dir() or len(key) != 32:
            continue
        if key == own_key:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            continue
        lock = root / f".{key}.lock"
        try:
            info = json.loads(lock.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        try:
            old = time.time() - tmp.stat().st_mtime > stale_after
        except OSError:
            continue
        if not (old or info.get("host") == socket.gethostname()):
            continue
        try:
            fh = open(lock, "a+")
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being built now (by us or by another process)
            # free lock: only a dead builder can have left this folder; we hold the lock, so none starts now
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        finally:
            fh.close()
    return removed


def publish(tmp: Path, final: Path) -> Path:
    """Rename a finished temporary folder into place; if another process won the race, keep theirs.

    Every file's size and checksum go into ``INTEGRITY.json`` first, for :meth:`PreparedCache.open` to verify.
    """
    from affinage import integrity
    from affinage.run import atomic_write_json

    atomic_write_json(tmp / INTEGRITY, integrity.manifest(tmp, exclude=(INTEGRITY,)))
    try:
        os.replace(tmp, final)
    except OSError:
        if (final / "meta.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    return final


# -------------------------------------------------------------------------------------- reading
class PackedSplit:
    """One split of a cache (``train`` or ``heldout``), memory-mapped: rows of segments.

    ``split[r]`` gives ``{"input_ids", "loss_mask", "seq_lens"}`` as numpy arrays (views of the map).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.input_ids = np.load(self.folder / "input_ids.npy", mmap_mode="r")
        self.loss_mask = np.load(self.folder / "loss_mask.npy", mmap_mode="r")
        self.seq_offsets = np.load(self.folder / "seq_offsets.npy", mmap_mode="r")
        self.row_seq = np.asarray(np.load(self.folder / "row_seq.npy"))

    def __len__(self) -> int:
        return len(self.row_seq) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.seq_offsets[-1]) if len(self.seq_offsets) else 0

    @property
    def num_segments(self) -> int:
        return len(self.seq_offsets) - 1

    def row_bounds(self, r: int) -> tuple[int, int]:
        return int(self.seq_offsets[self.row_seq[r]]), int(self.seq_offsets[self.row_seq[r + 1]])

    def row_lengths(self) -> np.ndarray:
        starts = np.asarray(self.seq_offsets)[self.row_seq]
        return np.diff(starts)

    def __getitem__(self, r: int) -> dict:
        if r < 0:
            r += len(self)
        if not 0 <= r < len(self):
            raise IndexError(r)
        a, b = self.row_bounds(r)
        seq = np.asarray(self.seq_offsets[self.row_seq[r] : self.row_seq[r + 1] + 1])
        return {
            "input_ids": np.asarray(self.input_ids[a:b]),
            "loss_mask": np.asarray(self.loss_mask[a:b]),
            "seq_lens": np.diff(seq),
        }


@dataclass
class PreparedCache:
    """A prepared-data folder: its key, metadata, statistics and splits."""

    path: Path
    key: str
    meta: dict
    stats: dict
    train: PackedSplit
    heldout: Optional[PackedSplit]
    hit: bool = False
    seconds: float = 0.0

    @classmethod
    def open(cls, path: Path, hit: bool = False, seconds: float = 0.0) -> "PreparedCache":
        path = Path(path)
        t0 = time.perf_counter()
        verify_cache(path)
        seconds += time.perf_counter() - t0
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != DATA_FORMAT_VERSION:
            raise DataError(f"{path}: data cache format {meta.get('format_version')} is not {DATA_FORMAT_VERSION}; delete it")
        stats = json.loads((path / "stats.json").read_text(encoding="utf-8"))
        heldout = PackedSplit(path / "heldout") if (path / "heldout" / "row_seq.npy").is_file() else None
        if heldout is not None and len(heldout) == 0:
            heldout = None
        return cls(path=path, key=meta["key"], meta=meta, stats=stats, train=PackedSplit(path / "train"), heldout=heldout, hit=hit, seconds=seconds)


def verify_cache(path: Path) -> None:
    """Check a cache folder against its ``INTEGRITY.json``; a corrupt one is removed (the next run rebuilds it).

    Folders written before integrity records existed are trusted as they are.
    """
    from affinage import integrity

    record_path = path / INTEGRITY
    if not record_path.is_file():
        return
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        why = integrity.verify(path, record)
    except (OSError, ValueError) as e:
        why = f"{INTEGRITY} is unreadable ({e})"
    if why is None:
        return
    aside = path.with_name(f".{path.name}.corrupt")  # renamed first: no other reader opens it meanwhile
    try:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
        done = "it was removed: rerun the same command to rebuild it"
    except OSError:
        done = f"remove it (rm -r {path}) or rerun affinage prepare with --force"
    raise CorruptCacheError(f"the prepared-data cache {path} is corrupt: {why}; {done}", where=str(path), reason="corrupt cache")


def find_or_build(root: Path, key: str, *, force: bool, hasher, open_cache, build):
    """The one protocol of a cache folder: a hit opens it; a miss builds it once under the key's lock.

    ``open_cache(folder, hit)`` opens a published folder; ``build(tmp)`` fills a temporary sibling,
    which is published (checksummed, then renamed) when complete, or removed. Another process that
    built the same key while this one waited for the lock is a hit. SFT/CPT rows and preference
    pairs share this, so both get the same locking, integrity records and file modes.
    """
    import tempfile

    from affinage.run import dir_mode

    final = Path(root) / key
    if not force and (final / "meta.json").is_file():
        hasher.save()
        return open_cache(final, True)
    with build_lock(Path(root), key):
        if not force and (final / "meta.json").is_file():
            hasher.save()
            return open_cache(final, True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        os.chmod(tmp, dir_mode())  # mkdtemp makes 0700: a cache follows the umask (and sharing: group)
        try:
            build(tmp)
            if force and final.exists():
                shutil.rmtree(final)
            publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        hasher.save()
    return open_cache(final, False)
