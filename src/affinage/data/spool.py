"""Stage 1 of ``prepare``: read a source, convert, filter, dedup and decontaminate, spool the kept records.

The kept records go to a temporary file (``write_spool``/``read_spool``: one pickled
``(where, record)`` per record, 3x cheaper to write and read back than JSON lines), so the
tokenizer stage streams them and memory does not grow with the corpus (except 16 bytes per
document for exact dedup and the MinHash index for near dedup, both shared across sources). The
file is this process's own, read once and deleted with the work folder.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterator, Optional

from affinage.data.errors import DataError
from affinage.data.filters import ExactDedup, LengthFilter, NearDedup, document_text
from affinage.data.formats import canonical_kind, convert, detect_format
from affinage.data.mixture import check_kind
from affinage.data.readers import read_source
from affinage.data.stats import SourceState


class RecordFilters:
    """The recipe's record filters, shared by every source (a duplicate across sources is a duplicate)."""

    def __init__(self, data):
        f = data.filters
        self.length = LengthFilter(f.min_chars, f.max_chars)
        self.exact = ExactDedup() if f.exact_dedup else None
        self.near = NearDedup(f.near_dedup_threshold, f.near_dedup_num_perm, f.near_dedup_ngram) if f.near_dedup else None
        self.decon = None
        self.decon_action = data.decontamination.action if data.decontamination is not None else None
        if data.decontamination is not None:
            from affinage.data.decontam import build_eval_index

            self.decon = build_eval_index(data.decontamination)

    def reason(self, st: SourceState, where: str, record: dict, doc: str) -> Optional[str]:
        """Why ``record`` is dropped (a ``stats.FILTER_REASONS`` name), or None to keep it."""
        reason = self.length.reason(doc)
        if reason is None and self.exact is not None and self.exact.is_duplicate(doc):
            reason = "exact_duplicate"
        if reason is None and self.near is not None and self.near.is_duplicate(doc):
            reason = "near_duplicate"
        if reason is None and self.decon is not None:
            hit = self.decon.check(record)
            if hit is not None:
                st.contaminated_count += 1
                if len(st.contaminated) < 20:
                    st.contaminated.append({"where": where, "eval_files": hit.eval_files, "ngram": hit.ngram})
                if self.decon_action == "drop":
                    reason = "contaminated"
        return reason


def spool_source(st: SourceState, filters: RecordFilters, data, task: str, bar) -> None:
    """Read ``st.spec`` into ``st.spool``, counting in ``st`` what was read, skipped and dropped."""
    spec = st.spec
    fmt = None if spec.format == "auto" else spec.format
    with open(st.spool, "wb") as spool:
        for raw in read_source(spec, data.on_bad_record, st.skips):
            try:
                if fmt is None:  # the first good record fixes the format for the whole source
                    fmt = detect_format(raw.data, spec.text_field, spec.messages_field, raw.where)
                record = convert(raw, spec, fmt, system=data.system)
            except DataError as e:
                if data.on_bad_record != "skip":
                    raise
                st.skips.add_error(e)
                continue
            if st.read == 0:
                check_kind(st.name, fmt, canonical_kind(record), task)
            st.read += 1
            bar.update()
            doc = document_text(record)
            reason = filters.reason(st, raw.where, record, doc)
            if reason is not None:
                st.drop(reason)
            else:
                write_spool(spool, raw.where, record)
                st.kept += 1
                st.chars += len(doc)
            if spec.max_records and st.read >= spec.max_records:
                break
    st.fmt = fmt
    if st.read == 0:
        raise DataError(
            f"data source {st.name!r} ({spec.path}) gave no usable record"
            + (f" ({st.skips.count} skipped, e.g. {st.skips.examples[:3]})" if st.skips.count else " (it is empty)")
        )


def write_spool(fh, where: str, record: dict) -> None:
    """Append one kept record to an open spool file (binary)."""
    fh.write(pickle.dumps((where, record), protocol=pickle.HIGHEST_PROTOCOL))


class _PlainUnpickler(pickle.Unpickler):
    """Loads JSON-shaped values only (dict, list, str, numbers, bool, None: pickle has opcodes for them).

    Every class lookup is refused, so a spool file swapped in by someone else (a cache folder may be
    group-shared on a cluster) cannot run code. Canonical records are JSON-shaped (the spool was JSON
    lines before), so nothing affinage writes needs a class.
    """

    def find_class(self, module, name):
        raise DataError(f"a prepare spool file holds an object of class {module}.{name}, which affinage never writes: "
                        "the cache's work folder was changed by someone else; delete it and run prepare again")


def read_spool(path: Path) -> Iterator[tuple[str, dict]]:
    """The ``(where, record)`` of a spool file, in the order they were written."""
    with open(path, "rb") as fh:
        while True:
            try:
                yield _PlainUnpickler(fh).load()  # one per record: one kept for the file would memoise every record
            except EOFError:
                return
