"""``affinage prepare``: sources → filtered, tokenized, packed, memory-mapped cache (CPU, once).

Stages, each streaming (memory does not grow with the corpus, except 16 bytes per document for
exact dedup, the MinHash index for near dedup, and a few integers per sample):

1. read each source (``readers`` + ``formats``: canonical records, NFC), apply the length filters,
   exact and near dedup and decontamination, and spool the kept records to a temporary JSONL;
2. split held-out records and apply weights exactly like ``dataset.build_datasets`` (same seeds, so
   with no filter the same split), then tokenize with ``num_proc`` processes (chat template and
   loss mask from ``templates``), dropping documents outside the token bounds, into a flat sample
   store on disk;
3. pack (``packing``) and write the rows of each split as flat ``.npy`` arrays (``cache``), then
   statistics; the folder is renamed into place when complete.

The cache key (``cache.key_of``) covers every input, so an unchanged recipe finds its folder in well
under a second and any change (a source file, the tokenizer, the template, a setting) builds a new one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from affinage.data.cache import (
    DATA_FORMAT_VERSION,
    PreparedCache,
    build_lock,
    cache_root,
    key_of,
    publish,
    tokenizer_fingerprint,
)
from affinage.data.dataset import check_kind, heldout_counts, source_names, weighted_indices
from affinage.data.errors import DataError, SkipCounter
from affinage.hashing import FileHasher, int_hash, sha256_text
from affinage.paths import expand
from affinage.data.filters import ExactDedup, LengthFilter, NearDedup, document_text
from affinage.data.formats import canonical_kind, convert, detect_format
from affinage.data.packing import Layout, layout_bfd, layout_concat, layout_single, padding_fraction
from affinage.data.readers import read_source, source_path
from affinage.hardware import usable_cpus

NO_LIMIT = 1 << 40
CHUNK_RECORDS = 64
PERCENTILES = (50, 90, 99)


# =========================================================================================== key
def _tokenizer_folder(recipe) -> Optional[Path]:
    from affinage.model.resolve import resolve_model_path

    spec = recipe.model
    source = spec.tokenizer or spec.name_or_path
    try:
        return resolve_model_path(source, revision=spec.revision if spec.tokenizer is None else None, mirrors=spec.mirrors, kind="tokenizer")
    except Exception:
        return None


def _template_identity(recipe, hasher: FileHasher) -> Optional[str]:
    from affinage.data.templates import NAMED_TEMPLATES

    name = recipe.model.chat_template
    if not name or recipe.task != "sft":
        return None
    if name in NAMED_TEMPLATES:
        return "named:" + name + ":" + str(sha256_text(NAMED_TEMPLATES[name]))
    path = expand(name)
    return "file:" + (hasher.file(path) if path.is_file() else f"missing:{name}")


def cache_key_inputs(recipe, tokenizer=None, hasher: Optional[FileHasher] = None) -> dict:
    """Everything the prepared data depends on, as a JSON-able dict (its hash is the cache key).

    The tokenizer is identified by the files of its folder when the recipe's tokenizer resolves
    to one (no need to load it), else by ``tokenizer`` itself (its JSON, special ids and template).
    """
    hasher = hasher or FileHasher(None)
    data = recipe.data
    sources = []
    for spec, name in zip(data.sources, source_names(data.sources)):
        path = source_path(spec)
        if not path.exists():
            read_source(spec).__next__()  # raises the reader's "not found, did you mean" DataError
        d = spec.model_dump(mode="json")
        d["name"] = name
        d["content_sha256"] = hasher.tree(path)
        sources.append(d)
    folder = _tokenizer_folder(recipe)
    if folder is not None:
        tok_id = {"folder_sha256": hasher.tree(folder, skip_weights=True)}
    elif tokenizer is not None:
        # a template named in the recipe is keyed by chat_template below (and gets set on the object)
        tok_id = {"object_sha256": tokenizer_fingerprint(tokenizer, with_template=not recipe.model.chat_template)}
    else:
        raise DataError(f"cannot find the tokenizer of {recipe.model.tokenizer or recipe.model.name_or_path} to key the data cache")
    decon = None
    if data.decontamination is not None:
        decon = data.decontamination.model_dump(mode="json")
        decon["eval_sha256"] = [hasher.tree(expand(f)) for f in data.decontamination.eval_files]
    settings = data.model_dump(mode="json", exclude={"sources", "cache_dir", "num_proc", "decontamination"})
    return {
        "format_version": DATA_FORMAT_VERSION,
        "task": recipe.task,
        "seed": recipe.seed,
        "sources": sources,
        "tokenizer": tok_id,
        "chat_template": _template_identity(recipe, hasher),
        "data": settings,
        "decontamination": decon,
    }


# ====================================================================================== workers
_W: dict[str, Any] = {}


def _init_worker(tokenizer, task: str, max_length: int, packing: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W.update(tokenizer=tokenizer, task=task, max_length=max_length, packing=packing)


def _tokenize_one(tokenizer, task: str, max_length: int, packing: str, record: dict):
    """(pieces, full_length, truncated): pieces are (ids uint32, mask uint8) arrays."""
    from affinage.data.templates import tokenize_chat, tokenize_text

    if task == "sft":
        s = tokenize_chat(tokenizer, record["messages"], NO_LIMIT, tools=record.get("tools"))
        ids = np.asarray(s.input_ids, dtype=np.uint32)
        mask = np.asarray(s.loss_mask, dtype=np.uint8)
        full = len(ids)
        return [(ids[:max_length], mask[:max_length])], full, full > max_length
    chunks = tokenize_text(tokenizer, record["text"], NO_LIMIT)
    if not chunks:
        return [], 0, False
    ids = np.asarray(chunks[0].input_ids, dtype=np.uint32)
    full = len(ids)
    if packing == "concat":
        return [(ids, np.ones(full, np.uint8))], full, False
    pieces = [(ids[i : i + max_length], np.ones(min(max_length, full - i), np.uint8)) for i in range(0, full, max_length)]
    return [p for p in pieces if len(p[0]) > 1], full, False


def _tokenize_chunk(chunk: list[tuple[int, str, dict]]):
    out = []
    tok, task, max_length, packing = _W["tokenizer"], _W["task"], _W["max_length"], _W["packing"]
    for idx, where, record in chunk:
        try:
            out.append((idx, None, _tokenize_one(tok, task, max_length, packing, record)))
        except DataError as e:
            reason = "chat template error" if task == "sft" else "tokenization error"
            out.append((idx, (f"{where}: {e}", where, reason), None))
    return out


def _run_chunks(chunks: Iterator[list], num_proc: int, tokenizer, cfg: tuple) -> Iterator[list]:
    """Results of ``_tokenize_chunk`` in order; at most ~2 chunks per process in flight (flat memory)."""
    if num_proc <= 1:
        _init_worker(tokenizer, *cfg)
        for c in chunks:
            yield _tokenize_chunk(c)
        return
    import multiprocessing as mp

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer, *cfg)) as pool:
        pending: deque = deque()
        for c in chunks:
            pending.append(pool.apply_async(_tokenize_chunk, (c,)))
            if len(pending) >= 2 * num_proc + 1:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ==================================================================================== sample store
class _SampleStore:
    """Tokenized samples appended to two flat files (ids uint32, mask uint8) plus per-sample arrays."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.f_ids = open(folder / "ids.bin", "wb")
        self.f_mask = open(folder / "mask.bin", "wb")
        self.offsets = array("q", [0])
        self.source = array("i")
        self.uses = array("i")

    def add(self, ids: np.ndarray, mask: np.ndarray, source: int, uses: int) -> None:
        self.f_ids.write(ids.astype(np.uint32, copy=False).tobytes())
        self.f_mask.write(mask.astype(np.uint8, copy=False).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.source.append(source)
        self.uses.append(uses)

    def close(self) -> None:
        self.f_ids.close()
        self.f_mask.close()

    def __len__(self) -> int:
        return len(self.source)

    def arrays(self):
        n = self.offsets[-1]
        ids = np.memmap(self.folder / "ids.bin", dtype=np.uint32, mode="r", shape=(n,)) if n else np.zeros(0, np.uint32)
        mask = np.memmap(self.folder / "mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
        return ids, mask, np.frombuffer(self.offsets, dtype=np.int64)


# ========================================================================================= stats
def _length_stats(lengths) -> dict:
    a = np.asarray(lengths, dtype=np.int64)
    if not len(a):
        return {"count": 0}
    out = {"count": int(len(a)), "mean": round(float(a.mean()), 2), "min": int(a.min()), "max": int(a.max())}
    for p, v in zip(PERCENTILES, np.percentile(a, PERCENTILES)):
        out[f"p{p}"] = round(float(v), 1)
    return out


def _split_counts() -> dict:
    return {"records": 0, "records_weighted": 0, "samples": 0, "tokens": 0, "loss_tokens": 0, "truncated": 0,
            "dropped_no_loss": 0, "split_documents": 0}


@dataclass
class _SourceState:
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
    counts: dict = field(default_factory=lambda: {"train": _split_counts(), "heldout": _split_counts()})
    heldout_records: int = 0
    train_records: int = 0


# ======================================================================================= prepare
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
    t0 = time.perf_counter()
    root = Path(root) if root is not None else cache_root(recipe.data)
    hasher = FileHasher(root if root.is_dir() or _can_create(root) else None)
    inputs = cache_key_inputs(recipe, tokenizer, hasher)
    key = key_of(inputs)
    final = root / key
    if not force and (final / "meta.json").is_file():
        hasher.save()
        return PreparedCache.open(final, hit=True, seconds=time.perf_counter() - t0)
    with build_lock(root, key):
        if not force and (final / "meta.json").is_file():
            hasher.save()
            return PreparedCache.open(final, hit=True, seconds=time.perf_counter() - t0)
        if tokenizer is None:
            from affinage.model.load import load_tokenizer

            tokenizer = load_tokenizer(recipe.model)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            _build(recipe, tokenizer, tmp, inputs, key, num_proc or recipe.data.num_proc or usable_cpus(), progress)
            if force and final.exists():
                shutil.rmtree(final)
            publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        hasher.save()
    return PreparedCache.open(final, hit=False, seconds=time.perf_counter() - t0)


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
    f = data.filters
    length = LengthFilter(f.min_chars, f.max_chars)
    exact = ExactDedup() if f.exact_dedup else None
    near = NearDedup(f.near_dedup_threshold, f.near_dedup_num_perm, f.near_dedup_ngram) if f.near_dedup else None
    decon = None
    if data.decontamination is not None:
        from affinage.data.decontam import build_eval_index

        decon = build_eval_index(data.decontamination)
    states: list[_SourceState] = []
    for i, (spec, name) in enumerate(zip(data.sources, source_names(data.sources))):
        st = _SourceState(name=name, spec=spec, spool=work / f"spool-{i}.jsonl")
        states.append(st)
        fmt = None if spec.format == "auto" else spec.format
        bar = tqdm(desc=f"read {name}", unit=" doc", disable=disable)
        with open(st.spool, "w", encoding="utf-8") as spool:
            for raw in read_source(spec, data.on_bad_record, st.skips):
                try:
                    if fmt is None:
                        fmt = detect_format(raw.data, spec.text_field, spec.messages_field, raw.where)
                    record = convert(raw, spec, fmt, system=data.system)
                except DataError as e:
                    if data.on_bad_record != "skip":
                        raise
                    st.skips.add_error(e)
                    continue
                if st.read == 0:
                    check_kind(name, fmt, canonical_kind(record), task)
                st.read += 1
                bar.update()
                doc = document_text(record)
                reason = length.reason(doc)
                if reason is None and exact is not None and exact.is_duplicate(doc):
                    reason = "exact_duplicate"
                if reason is None and near is not None and near.is_duplicate(doc):
                    reason = "near_duplicate"
                if reason is None and decon is not None:
                    hit = decon.check(record)
                    if hit is not None:
                        st.contaminated_count += 1
                        if len(st.contaminated) < 20:
                            st.contaminated.append({"where": raw.where, "eval_files": hit.eval_files, "ngram": hit.ngram})
                        if data.decontamination.action == "drop":
                            reason = "contaminated"
                if reason is not None:
                    st.dropped[reason] = st.dropped.get(reason, 0) + 1
                else:
                    spool.write(json.dumps({"w": raw.where, "r": record}, ensure_ascii=False) + "\n")
                    st.kept += 1
                    st.chars += len(doc)
                if spec.max_records and st.read >= spec.max_records:
                    break
        bar.close()
        st.fmt = fmt
        if st.read == 0:
            raise DataError(
                f"data source {name!r} ({spec.path}) gave no usable record"
                + (f" ({st.skips.count} skipped, e.g. {st.skips.examples[:3]})" if st.skips.count else " (it is empty)")
            )
    t_read = time.perf_counter() - t_start

    # ---- stage 2: split, weight, tokenize
    stores = {"train": _SampleStore(work / "train"), "heldout": _SampleStore(work / "heldout")}
    hcounts = heldout_counts([s.kept for s in states], data.heldout_fraction, data.heldout_max)
    total_docs = sum(s.kept for s in states)
    bar = tqdm(total=total_docs, desc="tokenize", unit=" doc", disable=disable)
    t_tok0 = time.perf_counter()
    tokens_done = 0
    full_loss = 0  # sft samples whose loss mask covers every predicted token (a template problem if all are)
    cfg = (task, data.max_length, data.packing)
    for si, (st, k) in enumerate(zip(states, hcounts)):
        held = set(random.Random(f"{seed}/heldout/{st.name}").sample(range(st.kept), k)) if st.kept else set()
        st.heldout_records, st.train_records = k, st.kept - k
        train_pos = {}
        uses_list = weighted_indices(st.kept - k, st.spec.weight, random.Random(f"{seed}/weight/{st.name}"))
        n_uses = np.bincount(np.asarray(uses_list, dtype=np.int64), minlength=st.kept - k) if uses_list else np.zeros(st.kept - k, np.int64)
        j = 0
        for i in range(st.kept):
            if i not in held:
                train_pos[i] = j
                j += 1
        st.counts["train"]["records"] = st.kept - k
        st.counts["train"]["records_weighted"] = int(n_uses.sum())
        st.counts["heldout"]["records"] = st.counts["heldout"]["records_weighted"] = k

        def records() -> Iterator[list]:
            chunk = []
            with open(st.spool, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if i not in held and n_uses[train_pos[i]] == 0:
                        bar.update()
                        continue  # weight < 1 left this record out: no need to tokenize it
                    obj = json.loads(line)
                    chunk.append((i, obj["w"], obj["r"]))
                    if len(chunk) >= CHUNK_RECORDS:
                        yield chunk
                        chunk = []
            if chunk:
                yield chunk

        for results in _run_chunks(records(), num_proc, tokenizer, cfg):
            for i, err, res in results:
                bar.update()
                split = "heldout" if i in held else "train"
                uses = 1 if split == "heldout" else int(n_uses[train_pos[i]])
                c = st.counts[split]
                if err is not None:
                    e = DataError(err[0], where=err[1], reason=err[2])
                    if data.on_bad_record != "skip":
                        bar.close()
                        raise e
                    st.skips.add_error(e)
                    continue
                pieces, full, truncated = res
                tokens_done += full
                if full < f.min_tokens or (f.max_tokens is not None and full > f.max_tokens):
                    r = "too_short_tokens" if full < f.min_tokens else "too_long_tokens"
                    st.dropped[r] = st.dropped.get(r, 0) + 1
                    continue
                st.doc_tokens.append(full)
                if task == "cpt" and len(pieces) > 1:
                    c["split_documents"] += uses
                for ids, mask in pieces:
                    n_loss = int(mask[1:].sum())
                    if truncated:
                        c["truncated"] += uses
                    if task == "sft" and n_loss == 0:
                        c["dropped_no_loss"] += uses
                        continue
                    if split == "train" and n_loss == len(ids) - 1:
                        full_loss += 1
                    stores[split].add(ids, mask, si, uses)
                    c["samples"] += uses
                    c["tokens"] += uses * len(ids)
                    c["loss_tokens"] += uses * n_loss
            if bar.n and not bar.disable:
                dt = max(1e-9, time.perf_counter() - t_tok0)
                bar.set_postfix_str(f"{bar.n / dt:,.0f} doc/s, {tokens_done / dt:,.0f} tok/s")
    bar.close()
    t_tok = time.perf_counter() - t_tok0
    for s in stores.values():
        s.close()
    if task == "sft" and len(stores["train"]) and full_loss == len(stores["train"]):
        raise DataError(
            "the loss mask covers the whole sequence of every sft sample (every token after the first is loss-bearing): "
            "the prompt would be trained on too. This is a template/masking problem; refusing to train silently on "
            "full sequences (use task: cpt for raw text)"
        )

    # ---- stage 3: pack and write
    t_pack0 = time.perf_counter()
    split_stats = {}
    for split, store in stores.items():
        split_stats[split] = _pack_and_write(store, out / split, data, seed, split)
    t_pack = time.perf_counter() - t_pack0
    shutil.rmtree(work)

    stats = _stats(recipe, states, split_stats, decon, tokens_done, num_proc,
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


def _pad_id(tokenizer) -> Optional[int]:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)


def _pack_and_write(store: _SampleStore, folder: Path, data, seed: int, split: str) -> dict:
    """Lay the store's samples out in rows (packing) and write the split's arrays."""
    ids, mask, offsets = store.arrays()
    lengths = np.diff(offsets)
    uses = np.frombuffer(store.uses, dtype=np.int32).astype(np.int64)
    items = np.repeat(np.arange(len(lengths), dtype=np.int64), uses)  # a record of weight 2 is packed twice
    if data.shuffle and len(items):
        perm = np.random.default_rng(abs(int_hash(f"{seed}/pack/{split}"))).permutation(len(items))
        items = items[perm]
    item_len = lengths[items]
    if data.packing == "bfd":
        layout = layout_bfd(item_len, data.max_length)
    elif data.packing == "concat":
        layout = layout_concat(item_len, data.max_length, document_mask=data.document_mask)
    else:
        layout = layout_single(item_len)
    layout = Layout(items[layout.item] if len(layout.item) else layout.item, layout.start, layout.length, layout.row_offsets, layout.merge_segments)
    if data.shuffle and data.packing != "concat":
        layout = layout.shuffled(f"{seed}/rows/{split}")
    return write_rows(ids, mask, offsets, layout, folder, data.max_length)


def write_rows(ids, mask, offsets, layout: Layout, folder: Path, max_length: int) -> dict:
    """Write ``layout`` (pieces of the samples in ``ids``/``mask``) as a cache split; return its counts."""
    folder.mkdir(parents=True, exist_ok=True)
    total = int(layout.length.sum())
    n_rows = layout.num_rows
    n_seg = n_rows if layout.merge_segments else len(layout.length)
    open_mm = np.lib.format.open_memmap
    out_ids = open_mm(folder / "input_ids.npy", mode="w+", dtype=np.uint32, shape=(max(total, 0),)) if total else None
    out_mask = open_mm(folder / "loss_mask.npy", mode="w+", dtype=np.uint8, shape=(total,)) if total else None
    seq_offsets = np.zeros(n_seg + 1, dtype=np.int64)
    row_seq = np.zeros(n_rows + 1, dtype=np.int64)
    pos = seg = 0
    ro = layout.row_offsets.tolist()
    items, starts, lens = layout.item.tolist(), layout.start.tolist(), layout.length.tolist()
    for r in range(n_rows):
        for p in range(ro[r], ro[r + 1]):
            a = offsets[items[p]] + starts[p]
            n = lens[p]
            out_ids[pos : pos + n] = ids[a : a + n]
            out_mask[pos : pos + n] = mask[a : a + n]
            if not layout.merge_segments or p == ro[r]:
                out_mask[pos] = 0  # the first token of a segment is never a prediction target
                seq_offsets[seg] = pos
                seg += 1
            pos += n
        row_seq[r + 1] = seg
    seq_offsets[seg] = pos
    if total:
        out_ids.flush()
        out_mask.flush()
        loss_tokens = int(np.asarray(out_mask).sum(dtype=np.int64))
        del out_ids, out_mask
    else:
        np.save(folder / "input_ids.npy", np.zeros(0, np.uint32))
        np.save(folder / "loss_mask.npy", np.zeros(0, np.uint8))
        loss_tokens = 0
    np.save(folder / "seq_offsets.npy", seq_offsets)
    np.save(folder / "row_seq.npy", row_seq)
    row_len = layout.row_lengths()
    return {
        "rows": n_rows,
        "segments": n_seg,
        "tokens": total,
        "loss_tokens": loss_tokens,
        "row_fill": round(1.0 - padding_fraction(row_len, max_length), 6) if n_rows else None,
        "padding_fraction_fixed_rows": round(padding_fraction(row_len, max_length), 6) if n_rows else None,
        "row_tokens": _length_stats(row_len),
        "segments_per_row": round(n_seg / n_rows, 3) if n_rows else None,
    }


def _stats(recipe, states: list[_SourceState], split_stats: dict, decon, tokens_done: int, num_proc: int, seconds: dict) -> dict:
    data = recipe.data
    sources = {}
    for st in states:
        filters = {}
        remaining = st.read
        for reason in ("too_short_chars", "too_long_chars", "exact_duplicate", "near_duplicate", "contaminated",
                       "too_short_tokens", "too_long_tokens"):
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
            "document_tokens": _length_stats(st.doc_tokens),
            "train": st.counts["train"],
            "heldout": st.counts["heldout"],
        }
        if decon is not None:
            entry["contamination"] = {"documents": st.contaminated_count, "action": data.decontamination.action,
                                      "examples": st.contaminated}
        sources[st.name] = entry
    totals = {}
    for part in ("train", "heldout"):
        agg = _split_counts()
        for s in sources.values():
            for k in agg:
                agg[k] += s[part][k]
        totals[part] = agg
    out = {
        "task": recipe.task,
        "seed": recipe.seed,
        "max_length": data.max_length,
        "on_bad_record": data.on_bad_record,
        "packing": {"mode": data.packing, "document_mask": data.document_mask if data.packing == "concat" else True,
                    "batches": "padding-free: the rows of a micro-batch are concatenated, so no pad token is computed on",
                    **{f"{k}": v for k, v in split_stats.items()}},
        "padding_fraction": 0.0,
        "sources": sources,
        "totals": totals,
        "tokenization": {"num_proc": num_proc, "documents": sum(s.kept for s in states), "tokens": tokens_done,
                         "tokens_per_second": round(tokens_done / seconds["tokenize"], 1) if seconds["tokenize"] else None,
                         "tokens_per_second_per_process": round(tokens_done / seconds["tokenize"] / num_proc, 1) if seconds["tokenize"] else None},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    if decon is not None:
        out["decontamination"] = {**decon.summary(), "action": data.decontamination.action,
                                  "documents": sum(s.contaminated_count for s in states)}
    return out


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


def format_prepare_summary(cache: PreparedCache) -> str:
    s = cache.stats
    lines = ["", "── affinage prepare " + "─" * 40,
             f"cache           {cache.path}  ({'hit' if cache.hit else 'built'} in {cache.seconds:.2f} s)"]
    for name, src in s["sources"].items():
        kept = src["documents_kept"]
        drops = ", ".join(f"{k} {v['dropped']}" for k, v in src["filters"].items()) or "no filter"
        lines.append(f"{name:<15} {src['records_read']} read, {kept} kept ({drops}); "
                     f"{src['train']['tokens']:,} train tokens, {src['train']['loss_tokens']:,} with loss")
    p = s["packing"]
    tr = p["train"]
    lines.append(f"packing         {p['mode']}: {tr['rows']} rows of ≤{s['max_length']} tokens, "
                 f"{tr['segments_per_row']} samples/row, row fill {tr['row_fill']}, padding computed on: {s['padding_fraction']}")
    if "decontamination" in s:
        d = s["decontamination"]
        lines.append(f"decontamination {d['documents']} documents share a {d['ngram']}-gram with {len(d['eval_files'])} eval file(s) ({d['action']})")
    t = s["tokenization"]
    if t["tokens_per_second"]:
        lines.append(f"tokenization    {t['tokens']:,} tokens, {t['tokens_per_second']:,.0f} tok/s on {t['num_proc']} processes")
    return "\n".join(lines)
