"""Statistics of a prepared cache (``stats.json``, copied to a run's ``data_stats.json``).

``SourceState`` gathers, while ``prepare`` runs, what happened to each source's records (read,
skipped, dropped by which filter, held out, weighted, tokenized, truncated); ``prepare_stats``
turns it and the written splits' counts into the JSON document. Counts cover each weighted use
(a record used twice counts twice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from affinage.data.errors import SkipCounter

PERCENTILES = (50, 90, 99)
FILTER_REASONS = ("too_short_chars", "too_long_chars", "exact_duplicate", "near_duplicate", "contaminated",
                  "too_short_tokens", "too_long_tokens")


def length_stats(lengths) -> dict:
    """count, mean, min, max and percentiles of a list of lengths."""
    a = np.asarray(lengths, dtype=np.int64)
    if not len(a):
        return {"count": 0}
    out = {"count": int(len(a)), "mean": round(float(a.mean()), 2), "min": int(a.min()), "max": int(a.max())}
    for p, v in zip(PERCENTILES, np.percentile(a, PERCENTILES)):
        out[f"p{p}"] = round(float(v), 1)
    return out


def split_counts() -> dict:
    return {"records": 0, "records_weighted": 0, "samples": 0, "tokens": 0, "loss_tokens": 0, "truncated": 0,
            "dropped_no_loss": 0, "split_documents": 0}


@dataclass
class SourceState:
    """What ``prepare`` learns about one source as it reads, filters and tokenizes it."""

    name: str
    spec: Any
    spool: Path
    fmt: Optional[str] = None
    read: int = 0
    kept: int = 0
    skips: SkipCounter = field(default_factory=SkipCounter)
    dropped: dict = field(default_factory=dict)
    contaminated: list = field(default_factory=list)
    contaminated_count: int = 0
    doc_tokens: list = field(default_factory=list)
    chars: int = 0
    counts: dict = field(default_factory=lambda: {"train": split_counts(), "heldout": split_counts()})
    heldout_records: int = 0
    train_records: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def _filter_on(data, reason: str) -> bool:
    f = data.filters
    return {
        "too_short_chars": f.min_chars > 0,
        "too_long_chars": f.max_chars is not None,
        "exact_duplicate": f.exact_dedup,
        "near_duplicate": f.near_dedup,
        "contaminated": data.decontamination is not None and data.decontamination.action == "drop",
        "too_short_tokens": f.min_tokens > 0,
        "too_long_tokens": f.max_tokens is not None,
    }[reason]


def prepare_stats(recipe, states: list[SourceState], split_stats: dict, decon, tokens_done: int, num_proc: int,
                  seconds: dict) -> dict:
    """The ``stats.json`` document: per source, totals, packing of each split, tokenization speed, timings."""
    data = recipe.data
    sources = {}
    for st in states:
        filters = {}
        remaining = st.read
        for reason in FILTER_REASONS:
            n = st.dropped.get(reason, 0)
            if reason in st.dropped or _filter_on(data, reason):
                filters[reason] = {"dropped": n, "kept_share": round((remaining - n) / remaining, 6) if remaining else None}
            remaining -= n
        entry = {
            "path": st.spec.path,
            "format": st.fmt,
            "weight": st.spec.weight,
            "licence": st.spec.licence,
            "origin": st.spec.origin,
            "records_read": st.read,
            "max_records": st.spec.max_records,
            "skipped": st.skips.as_dict(),
            "filters": filters,
            "documents_kept": st.read - sum(st.dropped.values()),
            "kept_share": round((st.read - sum(st.dropped.values())) / st.read, 6) if st.read else None,
            "heldout_records": st.heldout_records,
            "train_records": st.train_records,
            "train_records_weighted": st.counts["train"]["records_weighted"],
            "document_tokens": length_stats(st.doc_tokens),
            "train": st.counts["train"],
            "heldout": st.counts["heldout"],
        }
        if decon is not None:
            entry["contamination"] = {"documents": st.contaminated_count, "action": data.decontamination.action,
                                      "examples": st.contaminated}
        sources[st.name] = entry
    totals = {}
    for part in ("train", "heldout"):
        agg = split_counts()
        for s in sources.values():
            for k in agg:
                agg[k] += s[part][k]
        totals[part] = agg
    tok_s = seconds["tokenize"]
    out = {
        "task": recipe.task,
        "seed": recipe.seed,
        "max_length": data.max_length,
        "on_bad_record": data.on_bad_record,
        "packing": {"mode": data.packing, "document_mask": data.document_mask if data.packing == "concat" else True,
                    "batches": "padding-free: the rows of a micro-batch are concatenated, so no pad token is computed on",
                    **split_stats},
        "padding_fraction": 0.0,
        "sources": sources,
        "totals": totals,
        "tokenization": {"num_proc": num_proc, "documents": sum(s.kept for s in states), "tokens": tokens_done,
                         "tokens_per_second": round(tokens_done / tok_s, 1) if tok_s else None,
                         "tokens_per_second_per_process": round(tokens_done / tok_s / num_proc, 1) if tok_s else None},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    if decon is not None:
        out["decontamination"] = {**decon.summary(), "action": data.decontamination.action,
                                  "documents": sum(s.contaminated_count for s in states)}
    return out
