"""Tokenization of canonical records, batched through the fast tokenizer, in a pool of processes.

One chunk of records (``CHUNK_RECORDS``) is one call of the backend's ``encode_batch``:

* cpt: a document is [BOS] + tokens + [EOS], every token a target. This module is the one place a
  document is cut (``cut_document``): into pieces of ``max_length`` for ``bfd``/``none`` packing,
  not at all for ``concat`` (the row layout joins and cuts documents, ``packing.layout_concat``).
* sft: ``templates.chat_for_training`` renders each conversation once and finds its assistant spans
  (the sentinel and prompt renderings it compares come from ``templates.TemplateSkeletons``, one per
  role sequence and chunk, when the template writes contents verbatim); the chunk's texts are
  tokenized in one call with offsets, and the loss mask is ``templates.mask_array_from_spans``
  (numpy; the rule ``templates.tokenize_chat`` applies), right-truncated to ``max_length``. The
  result equals ``tokenize_chat`` record by record (tested).

The loss mask is a mask from here to the batch (bool, stored as uint8 in the cache); labels are
built once, by the collator (``affinage.data.collator``). Results come back in record order, with
at most ~2 chunks per process in flight, so memory stays flat.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from affinage.data.errors import DataError

CHUNK_RECORDS = 64


@dataclass
class TokenizedRecord:
    """A record's training pieces (ids uint32, loss mask bool), its full token length, whether it was cut short."""

    pieces: list[tuple[np.ndarray, np.ndarray]]
    full_length: int
    truncated: bool


# ------------------------------------------------------------------------------------ encoding
def fast_backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a fast HF tokenizer, without truncation or padding; None for a slow one.

    ``encode_batch`` on it gives the ids and offsets of ``tokenizer(texts, add_special_tokens=False)``
    without the wrapper's per-call conversion.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    if backend.truncation is not None or backend.padding is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return backend


def document_ids(tokenizer, texts: Sequence[str], backend=None) -> list[np.ndarray]:
    """[BOS] + tokens + [EOS] of each text (uint32), BOS/EOS only where the tokenizer has them."""
    if backend is not None:
        rows = [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    else:
        rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    out = []
    for ids in rows:
        a = np.empty(len(ids) + (bos is not None) + (eos is not None), dtype=np.uint32)
        lo = 0
        if bos is not None:
            a[0] = bos
            lo = 1
        a[lo : lo + len(ids)] = ids
        if eos is not None:
            a[-1] = eos
        out.append(a)
    return out


def cut_document(ids: np.ndarray, max_length: int, packing: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """A CPT document's pieces: whole for ``concat`` (rows are cut by the layout), else ``max_length``
    pieces; a piece of one token is dropped (it has no next token to predict)."""
    if len(ids) < 2:
        return []
    if packing == "concat":
        return [(ids, np.ones(len(ids), dtype=bool))]
    pieces = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [(p, np.ones(len(p), dtype=bool)) for p in pieces if len(p) > 1]


def require_fast(tokenizer) -> None:
    if fast_backend(tokenizer) is None:
        raise DataError(
            f"{type(tokenizer).__name__} is a slow tokenizer: loss masking needs offsets from a fast tokenizer (tokenizer.json)"
        )


# ------------------------------------------------------------------------------------- a chunk
def tokenize_chunk(tokenizer, backend, task: str, max_length: int, packing: str, chunk: Sequence[tuple[int, str, dict]],
                   special_ids: Optional[np.ndarray] = None) -> list:
    """``(index, error, TokenizedRecord)`` per record of ``chunk`` (``(index, where, record)``), in order.

    ``error`` is ``(message, where, reason)`` for a record the template cannot render (then no
    result), else None. ``special_ids``: the tokenizer's special token ids (computed when None).
    """
    if task == "sft":
        if special_ids is None:
            special_ids = special_id_array(tokenizer)
        return _chat_chunk(tokenizer, backend, max_length, chunk, special_ids)
    docs = document_ids(tokenizer, [rec["text"] for _, _, rec in chunk], backend)
    # a document of one token gives no piece and counts as empty (0 tokens)
    return [(idx, None, TokenizedRecord(cut_document(ids, max_length, packing), len(ids) if len(ids) > 1 else 0, False))
            for (idx, _, _), ids in zip(chunk, docs)]


def special_id_array(tokenizer) -> np.ndarray:
    from affinage.data.templates import special_token_ids

    return np.asarray(sorted(special_token_ids(tokenizer)), dtype=np.int64)


def _chat_chunk(tokenizer, backend, max_length: int, chunk, special_ids: np.ndarray) -> list:
    from affinage.data.templates import TemplateSkeletons, chat_for_training, end_markers, header_tokens, mask_array_from_spans

    out: list[Any] = [None] * len(chunk)
    texts, spans, slots = [], [], []
    headers = header_tokens(tokenizer, None, end_markers(tokenizer))  # the same for every record: once per chunk
    skeletons = TemplateSkeletons(tokenizer)  # one rendering per conversation, the others filled from these
    for k, (idx, where, rec) in enumerate(chunk):
        try:
            r = chat_for_training(tokenizer, rec["messages"], tools=rec.get("tools"), headers=headers, skeletons=skeletons)
        except DataError as e:
            out[k] = (idx, (f"{where}: {e}", where, "chat template error"), None)
            continue
        texts.append(r.text)
        spans.append(r.spans)
        slots.append(k)
    if not texts:
        return out
    # the whole chunk as one sequence: each text's offsets and spans shifted past the previous texts (and a
    # gap of one character), so one mask_array_from_spans call gives every record's mask, as per record
    encs = backend.encode_batch(texts, add_special_tokens=False)
    lengths = [len(e.ids) for e in encs]
    ids_all = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.uint32, count=sum(lengths))
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)), dtype=np.int64,
                          count=2 * len(ids_all)).reshape(-1, 2)
    shift = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]], dtype=np.int64)
    offsets += np.repeat(shift, lengths)[:, None]
    all_spans = [(a + int(d), b + int(d)) for sp, d in zip(spans, shift) for a, b in sp]
    mask_all = mask_array_from_spans(offsets, ids_all, all_spans, special_ids)
    pos = 0
    for k, n in zip(slots, lengths):
        ids, mask = ids_all[pos : pos + n], mask_all[pos : pos + n]
        pos += n
        out[k] = (chunk[k][0], None, TokenizedRecord([(ids[:max_length], mask[:max_length])], n, n > max_length))
    return out


# -------------------------------------------------------------------------------------- the pool
_W: dict[str, Any] = {}


def _init_worker(tokenizer, task: str, max_length: int, packing: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W.update(tokenizer=tokenizer, backend=fast_backend(tokenizer), task=task, max_length=max_length, packing=packing,
              special_ids=special_id_array(tokenizer) if task == "sft" else None)


def _work(chunk) -> list:
    return tokenize_chunk(_W["tokenizer"], _W["backend"], _W["task"], _W["max_length"], _W["packing"], chunk, _W["special_ids"])


def tokenize_chunks(chunks: Iterator[list], num_proc: int, tokenizer, task: str, max_length: int, packing: str,
                    ) -> Iterator[list]:
    """``tokenize_chunk`` of every chunk, in order, on ``num_proc`` processes (in this one when 1)."""
    if task == "sft":
        require_fast(tokenizer)
    cfg = (tokenizer, task, max_length, packing)
    if num_proc <= 1:
        _init_worker(*cfg)
        for c in chunks:
            yield _work(c)
        return
    import multiprocessing as mp

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(num_proc, initializer=_init_worker, initargs=cfg) as pool:
        pending: deque = deque()
        for c in chunks:
            pending.append(pool.apply_async(_work, (c,)))
            if len(pending) >= 2 * num_proc + 1:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
