"""Read one data source into plain dicts, each with the place it came from.

Every record carries its file and line (or row) so that a problem found three stages later
(format, template, tokenization) can still be reported as ``file:line``. Readers do not interpret
records: turning them into text or chat is ``formats``' job.

Supported sources: ``.jsonl`` / ``.json`` (JSON lines, or a JSON array in a ``.json``), ``.parquet``,
a folder written by ``datasets.Dataset.save_to_disk``, and a folder of ``.txt`` files (one record
per file).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from affinage.data.errors import DataError, SkipCounter
from affinage.paths import expand

JSON_SUFFIXES = (".jsonl", ".json")
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SKIP_HINT = "or set data.on_bad_record: skip to count and skip such records"


@dataclass(frozen=True)
class RawRecord:
    """One record as read, with its location (``line`` is 1-based, ``row`` 0-based)."""

    data: dict[str, Any]
    file: str
    line: Optional[int] = None
    row: Optional[int] = None

    @property
    def where(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.row is not None:
            return f"{self.file} (row {self.row})"
        return self.file


def source_path(spec) -> Path:
    """The source's path with ``~`` and environment variables expanded (cluster paths use $WORK, $DSDIR)."""
    return expand(spec.path)


def read_source(spec, on_bad_record: str = "error", skips: Optional[SkipCounter] = None) -> Iterator[RawRecord]:
    """Yield the records of ``spec`` (a ``SourceSpec``) in file order.

    A malformed record raises ``DataError`` naming file:line; with ``on_bad_record="skip"`` it is
    added to ``skips`` (pass your own counter to report it) and reading goes on. Errors that make
    the whole source unreadable (missing path, unsupported type, a broken JSON array) always raise.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip' (got {on_bad_record!r})")
    skips = skips if skips is not None else SkipCounter()
    path = source_path(spec)
    if not path.exists():
        raise DataError(_missing_path_message(spec.path, path), where=str(path), reason="missing path")

    if path.is_dir():
        if any((path / m).exists() for m in DATASET_MARKERS):
            records = _read_saved_dataset(path)
        else:
            records = _read_txt_folder(path, spec.text_field)
    elif path.suffix.lower() in JSON_SUFFIXES:
        records = _read_json(path)
    elif path.suffix.lower() == ".parquet":
        records = _read_parquet(path)
    else:
        raise DataError(
            f"{path}: unsupported data file type {path.suffix or '(no suffix)'!r}. Supported: .jsonl, .json, "
            ".parquet, a folder of .txt files, or a folder saved with datasets' save_to_disk",
            where=str(path),
            reason="unsupported file type",
        )

    for item in records:
        if isinstance(item, DataError):
            if on_bad_record == "skip":
                skips.add_error(item)
                continue
            raise item
        yield item


# ------------------------------------------------------------------------------------- JSON
def _read_json(path: Path) -> Iterator[RawRecord | DataError]:
    if path.suffix.lower() == ".json" and _first_char(path) == "[":
        yield from _read_json_array(path)
    else:
        yield from _read_json_lines(path)


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="replace")
    stripped = head.lstrip()
    return stripped[:1]


def _read_json_lines(path: Path) -> Iterator[RawRecord | DataError]:
    name = str(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{name}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield DataError(
                    f"{where}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8, {SKIP_HINT}",
                    where=where,
                    reason="not UTF-8",
                )
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                hint = ""
                if lineno == 1 and path.suffix.lower() == ".json" and line.strip() in ("{", "{\n"):
                    hint = " (this looks like one pretty-printed JSON document: write one object per line)"
                yield DataError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}){hint}. Each line must be one complete "
                    f"JSON object; fix or remove the line, {SKIP_HINT}",
                    where=where,
                    reason="bad JSON",
                )
                continue
            if not isinstance(obj, dict):
                yield DataError(
                    f"{where}: a JSON {type(obj).__name__} where a JSON object {{...}} was expected; "
                    f"each line must be one object, {SKIP_HINT}",
                    where=where,
                    reason="not a JSON object",
                )
                continue
            yield RawRecord(obj, name, line=lineno)


def _read_json_array(path: Path) -> Iterator[RawRecord | DataError]:
    name = str(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            items = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8", where=name, reason="not UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{name}:{e.lineno}: the file starts with '[' but is not a valid JSON array ({e.msg} at column {e.colno}); "
            "fix it, or convert it to JSON lines (one object per line) so that bad records can be skipped",
            where=f"{name}:{e.lineno}",
            reason="bad JSON array",
        ) from None
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            where = f"{name} (item {i})"
            yield DataError(
                f"{where}: a JSON {type(obj).__name__} where a JSON object {{...}} was expected; {SKIP_HINT}",
                where=where,
                reason="not a JSON object",
            )
            continue
        yield RawRecord(obj, name, row=i)


# ---------------------------------------------------------------------------------- parquet
def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    name = str(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError with its own wording
        raise DataError(f"{name}: cannot read as Parquet ({e})", where=name, reason="bad parquet") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield RawRecord(obj, name, row=row)
            row += 1


# ------------------------------------------------------------------- datasets.save_to_disk
def _read_saved_dataset(path: Path) -> Iterator[RawRecord]:
    import datasets

    name = str(path)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(
            f"{name}: looks like a datasets.save_to_disk folder but cannot be loaded ({e})", where=name, reason="bad dataset folder"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if "train" in ds:
            ds, name = ds["train"], f"{name}[train]"
        elif len(splits) == 1:
            ds, name = ds[splits[0]], f"{name}[{splits[0]}]"
        else:
            raise DataError(
                f"{name}: a DatasetDict with splits {splits} and no 'train' split; point data.sources[].path at "
                f"one split's folder, e.g. {path / splits[0]}",
                where=name,
                reason="ambiguous DatasetDict",
            )
    for row, obj in enumerate(ds):
        yield RawRecord(dict(obj), name, row=row)


# -------------------------------------------------------------------------------- txt folder
def _read_txt_folder(path: Path, text_field: str) -> Iterator[RawRecord | DataError]:
    files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        present = sorted(p.name for p in path.iterdir())[:10]
        raise DataError(
            f"{path}: a folder with no .txt files and no dataset_info.json/state.json (not a save_to_disk folder). "
            f"It holds: {present or 'nothing'}. Point data.sources[].path at a .jsonl/.parquet file, a folder of .txt "
            "files, or a datasets save_to_disk folder",
            where=str(path),
            reason="empty folder",
        )
    for p in files:
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            yield DataError(f"{p}: not valid UTF-8 (byte {e.start}); re-encode it as UTF-8, {SKIP_HINT}", where=str(p), reason="not UTF-8")
            continue
        yield RawRecord({text_field: text}, str(p))


# ------------------------------------------------------------------------------------ hints
def _missing_path_message(written: str, path: Path) -> str:
    msg = f"data source not found: {written!r}"
    resolved = path if path.is_absolute() else Path.cwd() / path
    msg += f" (looked for {resolved})"
    if not path.is_absolute():
        msg += f"; relative paths are resolved from the current directory {Path.cwd()}"
    parent = resolved.parent
    if parent.is_dir():
        close = difflib.get_close_matches(resolved.name, [p.name for p in parent.iterdir()], n=3, cutoff=0.6)
        if close:
            msg += f". Did you mean: {', '.join(str(parent / c) for c in close)}?"
    else:
        msg += f". The folder {parent} does not exist either"
    return msg
