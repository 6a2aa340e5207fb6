"""The in-memory pipeline, kept as a test oracle for ``prepare`` (it is not part of the product).

``build_datasets`` reads, splits, weights and tokenizes a recipe's sources into lists of
``TokenizedSample`` with plain Python: one ``templates.tokenize_chat`` call per conversation (through
the HF wrapper, not ``tokenize``'s batches), one ``tokenizer(text)`` call per document,
no filters, no packing, no processes. The cache built by ``prepare`` must hold exactly these
samples, as often as they are used here (``test_data_prepare_cache``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from affinage.data.errors import DataError, SkipCounter
from affinage.data.formats import convert, detect_format
from affinage.data.mixture import heldout_counts, source_names, weighted_indices
from affinage.data.readers import read_source
from affinage.data.templates import TokenizedSample, resolve_chat_template, tokenize_chat


@dataclass
class PreparedData:
    train: list[TokenizedSample]
    heldout: list[TokenizedSample]
    stats: dict = field(default_factory=dict)


def _records(spec, on_bad_record: str, on_system: str) -> list[tuple[str, dict]]:
    skips, out, fmt = SkipCounter(), [], None if spec.format == "auto" else spec.format
    for raw in read_source(spec, on_bad_record, skips):
        try:
            fmt = fmt or detect_format(raw.data, spec.text_field, spec.messages_field, raw.where)
            out.append((raw.where, convert(raw, spec, fmt, system=on_system)))
        except DataError:
            if on_bad_record != "skip":
                raise
            continue
        if spec.max_records and len(out) >= spec.max_records:
            break
    return out


def _text_samples(tokenizer, text: str, max_length: int) -> list[TokenizedSample]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [TokenizedSample(c, [True] * len(c)) for c in chunks if len(c) > 1]


def _samples(tokenizer, task: str, record: dict, max_length: int) -> list[TokenizedSample]:
    if task == "sft":
        s = tokenize_chat(tokenizer, record["messages"], max_length, tools=record.get("tools"))
        return [s] if any(s.loss_mask[1:]) else []
    return _text_samples(tokenizer, record["text"], max_length)


def build_datasets(recipe, tokenizer) -> PreparedData:
    """Train and held-out samples of ``recipe`` (shuffle, filters and packing left out)."""
    data, task, seed = recipe.data, recipe.task, recipe.seed
    if task == "sft":
        resolve_chat_template(tokenizer, recipe.model.chat_template, recipe.model.name_or_path)
    names = source_names(data.sources)
    sources = [_records(spec, data.on_bad_record, data.system) for spec in data.sources]
    counts = heldout_counts([len(r) for r in sources], data.heldout_fraction, data.heldout_max)
    train, heldout, stats = [], [], {"sources": {}}
    for name, spec, records, k in zip(names, data.sources, sources, counts):
        held = sorted(random.Random(f"{seed}/heldout/{name}").sample(range(len(records)), k))
        train_idx = [i for i in range(len(records)) if i not in set(held)]
        uses = weighted_indices(len(train_idx), spec.weight, random.Random(f"{seed}/weight/{name}"))
        tok_train = [_samples(tokenizer, task, records[i][1], data.max_length) for i in train_idx]
        train += [s for u in uses for s in tok_train[u]]
        heldout += [s for i in held for s in _samples(tokenizer, task, records[i][1], data.max_length)]
        stats["sources"][name] = {"train_records_weighted": len(uses)}
    return PreparedData(train=train, heldout=heldout, stats=stats)
