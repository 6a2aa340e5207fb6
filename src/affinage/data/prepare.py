"""``affinage prepare``: sources → filtered, tokenized, packed, memory-mapped cache (CPU, once).

Orchestration only; each stage streams (memory does not grow with the corpus) and has its module:

1. ``spool``: read each source (``readers`` + ``formats``: canonical records, NFC), apply the length
   filters, exact and near dedup and decontamination, and spool the kept records to a temporary file;
2. ``mixture``: split held-out records and weight the others (seeded); ``tokenize``: tokenize them
   with ``num_proc`` processes (chat template and loss mask from ``templates``), dropping documents
   outside the token bounds, into a flat sample store on disk (``rows.SampleStore``);
3. ``rows``: pack (``packing``) and write the rows of each split as flat ``.npy`` arrays (``cache``),
   then ``stats``; the folder is renamed into place when complete.

The cache key (``cache_key``) covers every input, so an unchanged recipe finds its folder in well
under a second and any change (a source file, the tokenizer, the template, a setting) builds a new one.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from affinage.data.cache import DATA_FORMAT_VERSION, PreparedCache, cache_root, find_or_build, key_of
from affinage.data.cache_key import cache_key_inputs
from affinage.data.errors import DataError
from affinage.data.mixture import SourceSplit, heldout_counts, source_names, split_source
from affinage.data.rows import SampleStore, pack_and_write
from affinage.data.spool import RecordFilters, read_spool, spool_source
from affinage.data.stats import SourceState, prepare_stats
from affinage.data.tokenize import CHUNK_RECORDS, tokenize_chunks
from affinage.hardware import usable_cpus
from affinage.hashing import FileHasher


def prepare(
    recipe,
    tokenizer=None,
    *,
    root: Optional[os.PathLike] = None,
    num_proc: Optional[int] = None,
    progress: Optional[bool] = None,
    force: bool = False,
) -> PreparedCache:
    """The recipe's prepared data: found in the cache (hit) or built and stored (miss).

    ``tokenizer``: used to build on a miss (default: loaded from the recipe); it also keys the
    cache when the recipe's tokenizer folder cannot be found (tests with in-memory tokenizers).
    """
    if recipe.task in ("dpo", "kto"):  # pairs are not packed: their own cache layout (affinage.data.preference)
        from affinage.data.preference import prepare_preference

        return prepare_preference(recipe, tokenizer, key_inputs=cache_key_inputs, root=root, progress=progress, force=force)
    t0 = time.perf_counter()
    root = Path(root) if root is not None else cache_root(recipe.data)
    hasher = FileHasher(root if root.is_dir() or _can_create(root) else None)
    inputs = cache_key_inputs(recipe, tokenizer, hasher)
    key = key_of(inputs)

    def build(tmp: Path) -> None:
        tok = tokenizer
        if tok is None:
            from affinage.model.load import load_tokenizer

            tok = load_tokenizer(recipe.model)
        _build(recipe, tok, tmp, inputs, key, num_proc or recipe.data.num_proc or usable_cpus(), progress)

    return find_or_build(root, key, force=force, hasher=hasher, build=build,
                         open_cache=lambda folder, hit: PreparedCache.open(folder, hit=hit, seconds=time.perf_counter() - t0))


def _can_create(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
        return True
    except OSError:
        return False


def _build(recipe, tokenizer, out: Path, inputs: dict, key: str, num_proc: int, progress: Optional[bool]) -> None:
    from tqdm.auto import tqdm

    from affinage.data.templates import resolve_chat_template

    data, task, seed = recipe.data, recipe.task, recipe.seed
    t_start = time.perf_counter()
    if task == "sft":
        resolve_chat_template(tokenizer, recipe.model.chat_template, recipe.model.name_or_path)
    work = out / "work"
    work.mkdir()
    disable = None if progress is None else not progress

    # ---- stage 1: read, filter, spool
    filters = RecordFilters(data)
    states: list[SourceState] = []
    for i, (spec, name) in enumerate(zip(data.sources, source_names(data.sources))):
        st = SourceState(name=name, spec=spec, spool=work / f"spool-{i}.bin")
        states.append(st)
        with tqdm(desc=f"read {name}", unit=" doc", disable=disable) as bar:
            spool_source(st, filters, data, task, bar)
    t_read = time.perf_counter() - t_start

    # ---- stage 2: split, weight, tokenize
    stores = {"train": SampleStore(work / "train"), "heldout": SampleStore(work / "heldout")}
    hcounts = heldout_counts([s.kept for s in states], data.heldout_fraction, data.heldout_max)
    bar = tqdm(total=sum(s.kept for s in states), desc="tokenize", unit=" doc", disable=disable)
    t_tok0 = time.perf_counter()
    tally = _Tally()
    for si, (st, k) in enumerate(zip(states, hcounts)):
        split = split_source(st.name, st.kept, k, st.spec.weight, seed)
        st.heldout_records, st.train_records = split.heldout_records, split.train_records
        st.counts["train"]["records"] = split.train_records
        st.counts["train"]["records_weighted"] = split.train_records_weighted
        st.counts["heldout"]["records"] = st.counts["heldout"]["records_weighted"] = split.heldout_records
        try:
            for results in tokenize_chunks(_chunks(st, split, bar), num_proc, tokenizer, task, data.max_length, data.packing):
                for i, err, res in results:
                    bar.update()
                    _store(st, si, split, i, err, res, stores, data, task, tally)
                if bar.n and not bar.disable:
                    dt = max(1e-9, time.perf_counter() - t_tok0)
                    bar.set_postfix_str(f"{bar.n / dt:,.0f} doc/s, {tally.tokens / dt:,.0f} tok/s")
        except BaseException:
            bar.close()
            raise
    bar.close()
    t_tok = time.perf_counter() - t_tok0
    for s in stores.values():
        s.close()
    if task == "sft" and len(stores["train"]) and tally.full_loss == len(stores["train"]):
        raise DataError(
            "the loss mask covers the whole sequence of every sft sample (every token after the first is loss-bearing): "
            "the prompt would be trained on too. This is a template/masking problem; refusing to train silently on "
            "full sequences (use task: cpt for raw text)"
        )

    # ---- stage 3: pack and write
    t_pack0 = time.perf_counter()
    split_stats = {split: pack_and_write(store, out / split, data, seed, split) for split, store in stores.items()}
    t_pack = time.perf_counter() - t_pack0
    shutil.rmtree(work)

    stats = prepare_stats(recipe, states, split_stats, filters.decon, tally.tokens, num_proc,
                          {"read_filter": t_read, "tokenize": t_tok, "pack_write": t_pack, "total": time.perf_counter() - t_start})
    meta = {
        "format_version": DATA_FORMAT_VERSION,
        "key": key,
        "inputs": inputs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pad_token_id": _pad_id(tokenizer),
        "splits": {k: {kk: v[kk] for kk in ("rows", "segments", "tokens", "loss_tokens")} for k, v in split_stats.items()},
    }
    from affinage.run import atomic_write_json

    atomic_write_json(out / "stats.json", stats)
    atomic_write_json(out / "meta.json", meta)


@dataclass
class _Tally:
    tokens: int = 0  # tokens tokenized (full documents, before truncation)
    full_loss: int = 0  # sft training samples whose mask covers every predicted token (a template problem if all are)


def _chunks(st: SourceState, split: SourceSplit, bar) -> Iterator[list]:
    """The spooled records to tokenize, ``CHUNK_RECORDS`` at a time, as ``(index, where, record)``."""
    chunk = []
    for i, (where, record) in enumerate(read_spool(st.spool)):
        if split.uses[i] == 0:
            bar.update()
            continue  # weight < 1 left this record out: no need to tokenize it
        chunk.append((i, where, record))
        if len(chunk) >= CHUNK_RECORDS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _store(st: SourceState, si: int, split: SourceSplit, i: int, err, res, stores: dict, data, task: str, tally: _Tally) -> None:
    """Count one tokenized record and add its pieces to its split's store (``uses`` times for weights)."""
    name = "heldout" if i in split.heldout else "train"
    uses = int(split.uses[i])
    c = st.counts[name]
    if err is not None:
        e = DataError(err[0], where=err[1], reason=err[2])
        if data.on_bad_record != "skip":
            raise e
        st.skips.add_error(e)
        return
    f = data.filters
    full = res.full_length
    tally.tokens += full
    if full < f.min_tokens or (f.max_tokens is not None and full > f.max_tokens):
        st.drop("too_short_tokens" if full < f.min_tokens else "too_long_tokens")
        return
    st.doc_tokens.append(full)
    if task == "cpt" and len(res.pieces) > 1:
        c["split_documents"] += uses
    for ids, mask in res.pieces:
        n_loss = int(np.count_nonzero(mask[1:]))
        if res.truncated:
            c["truncated"] += uses
        if task == "sft" and n_loss == 0:
            c["dropped_no_loss"] += uses
            continue
        if name == "train" and n_loss == len(ids) - 1:
            tally.full_loss += 1
        stores[name].add(ids, mask, si, uses)
        c["samples"] += uses
        c["tokens"] += uses * len(ids)
        c["loss_tokens"] += uses * n_loss


def _pad_id(tokenizer) -> Optional[int]:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
