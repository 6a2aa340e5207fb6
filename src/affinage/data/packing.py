"""Packing samples into rows of at most ``max_length`` tokens (numpy only, no torch).

Three layouts, all described the same way (pieces of samples, grouped into rows):

* ``bfd`` — best-fit decreasing: samples sorted by length, longest first, each put in the open row
  whose free space is the smallest that still fits it (a segment tree over free space makes each
  placement O(log max_length)). Samples are never split. Each sample is its own segment: positions
  restart at 0 and it attends only to itself, so a packed row trains exactly like its samples one
  by one (tested in ``tests/data/test_data_packing*``).
* ``concat`` (continued pretraining) — documents (each [BOS] text [EOS]) joined in order and cut
  into rows of exactly ``max_length``: no padding at all. With ``document_mask`` each document
  piece is its own segment (no attention across documents); without it a row is one segment and a
  document sees the end of the previous one through the EOS separator (classic GPT pretraining).
  A document cut at a row boundary goes on at the start of the next row, without its beginning.
* ``none`` — one sample per row.

The first token of every segment carries no loss (it has nothing before it to be predicted from):
this is what makes packed and unpacked losses equal, since a causal LM never predicts token 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np


@dataclass
class Layout:
    """Rows as lists of pieces: piece p is tokens [start, start+length) of sample ``item[p]``.

    Row r holds pieces ``row_offsets[r] .. row_offsets[r+1]-1``. ``merge_segments``: a row's pieces
    form one attention segment (concat without document masking) instead of one segment each.
    """

    item: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row_offsets: np.ndarray
    merge_segments: bool = False

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    def row_lengths(self) -> np.ndarray:
        cs = np.concatenate([[0], np.cumsum(self.length, dtype=np.int64)])
        return cs[self.row_offsets[1:]] - cs[self.row_offsets[:-1]]

    def shuffled(self, seed) -> "Layout":
        """The same rows in a seeded random order."""
        order = list(range(self.num_rows))
        random.Random(seed).shuffle(order)
        counts = np.diff(self.row_offsets)
        idx = np.concatenate([np.arange(self.row_offsets[r], self.row_offsets[r + 1]) for r in order]) if order else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts[order], dtype=np.int64)]) if order else np.zeros(1, np.int64)
        return Layout(self.item[idx], self.start[idx], self.length[idx], offsets.astype(np.int64), self.merge_segments)


class _FreeSpaceTree:
    """Which free-space values (0..capacity) have an open row; finds the smallest value >= s."""

    def __init__(self, capacity: int):
        size = 1
        while size < capacity + 1:
            size *= 2
        self.size = size
        self.tree = bytearray(2 * size)

    def set(self, c: int, on: bool) -> None:
        i = c + self.size
        t = self.tree
        t[i] = 1 if on else 0
        i //= 2
        while i:
            v = 1 if (t[2 * i] or t[2 * i + 1]) else 0
            if t[i] == v:
                break
            t[i] = v
            i //= 2

    def first_at_least(self, lo: int) -> int:
        t, size = self.tree, self.size
        i = lo + size
        if t[i]:
            return lo
        while i > 1:
            if not i & 1 and t[i + 1]:
                i += 1
                break
            i //= 2
        else:
            return -1
        while i < size:
            i = 2 * i if t[2 * i] else 2 * i + 1
        return i - size


def best_fit_decreasing(lengths, capacity: int) -> np.ndarray:
    """Row index of each item (items longer than ``capacity`` are an error: truncate or split them first)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"an item of {int(lengths.max())} tokens does not fit rows of {capacity}")
    order = np.argsort(-lengths, kind="stable")
    tree = _FreeSpaceTree(capacity)
    buckets: dict[int, list[int]] = {}
    row_of = np.empty(len(lengths), dtype=np.int64)
    n_rows = 0
    for i, s in zip(order.tolist(), lengths[order].tolist()):
        c = tree.first_at_least(s) if s > 0 else -1
        if c < 0:
            b, free = n_rows, capacity - s
            n_rows += 1
        else:
            stack = buckets[c]
            b = stack.pop()
            if not stack:
                tree.set(c, False)
            free = c - s
        row_of[i] = b
        if free > 0:
            stack = buckets.setdefault(free, [])
            if not stack:
                tree.set(free, True)
            stack.append(b)
    return row_of


def layout_bfd(lengths, capacity: int) -> Layout:
    """Whole samples in best-fit-decreasing rows (rows in order of creation, samples longest first)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    row_of = best_fit_decreasing(lengths, capacity)
    # within a row: longest first (the order BFD placed them), rows in creation order
    order = np.lexsort((-lengths, row_of))
    counts = np.bincount(row_of, minlength=int(row_of.max()) + 1 if len(row_of) else 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Layout(order.astype(np.int64), np.zeros(len(order), np.int64), lengths[order], offsets)


def layout_single(lengths) -> Layout:
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    return Layout(np.arange(n, dtype=np.int64), np.zeros(n, np.int64), lengths.copy(), np.arange(n + 1, dtype=np.int64))


def layout_concat(lengths, capacity: int, document_mask: bool = True, min_piece: int = 2) -> Layout:
    """Items joined in the given order and cut into rows of ``capacity`` tokens (the last row may be short).

    Pieces shorter than ``min_piece`` tokens at a row start are still kept (they are context for the
    next document only without document masking); a final row of fewer than 2 tokens is dropped.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    items, starts, lens, row_offsets = [], [], [], [0]
    used = 0
    for i, n in enumerate(lengths.tolist()):
        pos = 0
        while pos < n:
            take = min(n - pos, capacity - used)
            items.append(i)
            starts.append(pos)
            lens.append(take)
            pos += take
            used += take
            if used == capacity:
                row_offsets.append(len(items))
                used = 0
    if used:
        if used >= min_piece:
            row_offsets.append(len(items))
        else:
            del items[row_offsets[-1]:], starts[row_offsets[-1]:], lens[row_offsets[-1]:]
    return Layout(
        np.asarray(items, np.int64), np.asarray(starts, np.int64), np.asarray(lens, np.int64),
        np.asarray(row_offsets, np.int64), merge_segments=not document_mask,
    )


def padding_fraction(row_lengths, capacity: int) -> float:
    """Share of a [rows × capacity] grid that would be padding."""
    row_lengths = np.asarray(row_lengths)
    if not len(row_lengths):
        return 0.0
    return float(1.0 - row_lengths.sum() / (len(row_lengths) * capacity))
