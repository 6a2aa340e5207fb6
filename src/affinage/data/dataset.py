"""From a recipe's ``data`` section to tokenized train and held-out samples, with statistics.

Order matters and is fixed: read (capped by ``max_records``) → canonical records → held-out split
per source → weights (repeat factors) on the training part only → tokenize → shuffle. Splitting
before weighting is what guarantees that no held-out record is ever trained on, even with
weight 2. Every random choice is seeded from ``recipe.seed`` and the source's name, so the same
recipe gives the same split and mixture on any machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from tqdm.auto import tqdm

from affinage.data.errors import DataError, SkipCounter
from affinage.data.formats import canonical_kind, convert, detect_format
from affinage.data.readers import read_source, source_path
from affinage.data.templates import TokenizedSample, resolve_chat_template, tokenize_chat, tokenize_text


@dataclass
class PreparedData:
    train: list[TokenizedSample]
    heldout: list[TokenizedSample]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Source:
    name: str
    spec: Any
    records: list[tuple[str, dict]]  # (where, canonical record)
    skips: SkipCounter
    fmt: Optional[str] = None
    heldout_idx: list[int] = field(default_factory=list)


def round_half_up(x: float) -> int:
    """Round like people do (2.5 → 3), not like ``round`` (banker's rounding, 2.5 → 2)."""
    return int(math.floor(x + 0.5))


def source_names(specs) -> list[str]:
    """A unique, readable name per source: ``name``, else the file or folder name."""
    names: list[str] = []
    for i, s in enumerate(specs):
        base = s.name or source_path(s).name or f"source{i}"
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def weighted_indices(n: int, weight: float, rng: random.Random) -> list[int]:
    """Indices of ``n`` records repeated by ``weight``: floor(weight) full copies plus a seeded subset.

    0.5 → a deterministic half, 2.0 → every record twice, 1.5 → all once plus half again.
    """
    whole = int(math.floor(weight))
    extra = round_half_up((weight - whole) * n)
    out = [i for _ in range(whole) for i in range(n)]
    out += sorted(rng.sample(range(n), min(extra, n)))
    return out


def heldout_counts(sizes: list[int], fraction: float, cap: Optional[int]) -> list[int]:
    """Held-out records per source: ``fraction`` of each, the total capped at ``cap`` (shared in proportion).

    At least one record of each source stays in training.
    """
    want = [min(round_half_up(fraction * n), max(n - 1, 0)) for n in sizes]
    if cap is None or sum(want) <= cap:
        return want
    total = sum(want)
    exact = [w * cap / total for w in want]
    counts = [int(math.floor(e)) for e in exact]
    by_remainder = sorted(range(len(want)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: cap - sum(counts)]:
        counts[i] += 1
    return counts


def _read(spec, name: str, on_bad_record: str, task: str) -> _Source:
    skips = SkipCounter()
    src = _Source(name=name, spec=spec, records=[], skips=skips)
    fmt = None if spec.format == "auto" else spec.format
    bar = tqdm(desc=f"read {name}", unit=" rec", disable=None)
    for raw in read_source(spec, on_bad_record, skips):
        try:
            if fmt is None:  # the first good record fixes the format for the whole source
                fmt = detect_format(raw.data, spec.text_field, spec.messages_field, raw.where)
            record = convert(raw, spec, fmt)
        except DataError as e:
            if on_bad_record != "skip":
                raise
            skips.add_error(e)
            continue
        src.records.append((raw.where, record))
        bar.update()
        if spec.max_records and len(src.records) >= spec.max_records:
            break
    bar.close()
    src.fmt = fmt
    if not src.records:
        raise DataError(
            f"data source {name!r} ({spec.path}) gave no usable record"
            + (f" ({skips.count} skipped, e.g. {skips.examples[:3]})" if skips.count else " (it is empty)")
        )
    check_kind(name, fmt, canonical_kind(src.records[0][1]), task)
    return src


def check_kind(name: str, fmt, kind: str, task: str) -> None:
    """A source's records must suit the task: raw text for cpt, conversations for sft."""
    if task == "sft" and kind == "text":
        raise DataError(
            f"data source {name!r} holds raw text (format {fmt}) but task is sft, which trains on assistant turns: "
            "use task: cpt for raw text, or chat/alpaca records for sft"
        )
    if task == "cpt" and kind == "chat":
        raise DataError(
            f"data source {name!r} holds chat records (format {fmt}) but task is cpt, which reads raw text: use task: sft "
            "for chat data, or set format: text and text_field for a text field"
        )


def _tokenize(src: _Source, idx, task, tokenizer, max_length, on_bad_record, desc) -> list[list[TokenizedSample]]:
    """Samples of each record in ``idx`` (one per SFT record, one per chunk for CPT).

    A record the chat template cannot render (e.g. roles that do not alternate for Mistral) is an
    error with its location, or a counted skip (no samples) under ``on_bad_record: skip``.
    """
    out = []
    for i in tqdm(idx, desc=desc, unit=" rec", disable=None):
        where, rec = src.records[i]
        try:
            if task == "sft":
                out.append([tokenize_chat(tokenizer, rec["messages"], max_length, tools=rec.get("tools"))])
            else:
                out.append(tokenize_text(tokenizer, rec["text"], max_length))
        except DataError as e:
            err = DataError(f"{where}: {e}", where=where, reason="chat template error" if task == "sft" else "tokenization error")
            if on_bad_record != "skip":
                raise err from None
            src.skips.add_error(err)
            out.append([])
    return out


def _collect(per_record: list[list[TokenizedSample]], task: str, counts: dict) -> list[TokenizedSample]:
    samples = []
    for group in per_record:
        if task == "cpt" and len(group) > 1:
            counts["split_documents"] += 1
        for s in group:
            if s.truncated:
                counts["truncated"] += 1
            if task == "sft" and s.num_loss_tokens == 0:
                counts["dropped_no_loss"] += 1
                continue
            samples.append(s)
            counts["samples"] += 1
            counts["tokens"] += len(s.input_ids)
            counts["loss_tokens"] += s.num_loss_tokens
    return samples


def _empty_counts() -> dict[str, int]:
    return {"samples": 0, "tokens": 0, "loss_tokens": 0, "truncated": 0, "dropped_no_loss": 0, "split_documents": 0}


def build_datasets(recipe, tokenizer) -> PreparedData:
    """Read, split, weight, tokenize and shuffle the recipe's sources; return samples and statistics.

    ``stats["sources"][name]`` gives per source: records read and skipped (with reasons and the
    first locations), held-out and training records (after weights), and for train and held-out
    the samples, tokens, loss-bearing tokens, truncated SFT samples, SFT samples dropped because
    truncation left no loss-bearing token, and CPT documents split into several chunks. These
    counts cover each weighted use (a record used twice counts twice).
    """
    data, task, seed = recipe.data, recipe.task, recipe.seed
    if task == "sft":
        resolve_chat_template(tokenizer, recipe.model.chat_template, recipe.model.name_or_path)
    names = source_names(data.sources)
    sources = [_read(spec, name, data.on_bad_record, task) for spec, name in zip(data.sources, names)]

    counts = heldout_counts([len(s.records) for s in sources], data.heldout_fraction, data.heldout_max)
    for src, k in zip(sources, counts):
        src.heldout_idx = sorted(random.Random(f"{seed}/heldout/{src.name}").sample(range(len(src.records)), k))

    train: list[TokenizedSample] = []
    heldout: list[TokenizedSample] = []
    stats: dict[str, Any] = {
        "task": task,
        "seed": seed,
        "max_length": data.max_length,
        "on_bad_record": data.on_bad_record,
        "sources": {},
    }
    for src in sources:
        held = set(src.heldout_idx)
        train_idx = [i for i in range(len(src.records)) if i not in held]
        uses = weighted_indices(len(train_idx), src.spec.weight, random.Random(f"{seed}/weight/{src.name}"))

        tok_train = _tokenize(src, train_idx, task, tokenizer, data.max_length, data.on_bad_record, f"tokenize {src.name}")
        tok_held = _tokenize(
            src, src.heldout_idx, task, tokenizer, data.max_length, data.on_bad_record, f"tokenize {src.name} (held-out)"
        )

        train_counts, held_counts = _empty_counts(), _empty_counts()
        train += _collect([tok_train[u] for u in uses], task, train_counts)
        heldout += _collect(tok_held, task, held_counts)
        stats["sources"][src.name] = {
            "path": src.spec.path,
            "format": src.fmt,
            "weight": src.spec.weight,
            "licence": src.spec.licence,
            "origin": src.spec.origin,
            "records_read": len(src.records),
            "max_records": src.spec.max_records,
            "skipped": src.skips.as_dict(),
            "heldout_records": len(src.heldout_idx),
            "train_records": len(train_idx),
            "train_records_weighted": len(uses),
            "train": train_counts,
            "heldout": held_counts,
        }

    if data.shuffle:
        random.Random(f"{seed}/shuffle").shuffle(train)
    totals = {}
    for part in ("train", "heldout"):
        agg = _empty_counts()
        for s in stats["sources"].values():
            for k in agg:
                agg[k] += s[part][k]
        totals[part] = agg
    stats["totals"] = totals
    return PreparedData(train=train, heldout=heldout, stats=stats)
