"""Tokenized samples to the rows of a cache split: a flat on-disk store, then the packed layout written as arrays.

``SampleStore`` appends each sample (ids uint32, loss mask uint8) to two flat files while the
tokenizer runs, so memory does not grow with the corpus; ``pack_and_write`` lays the samples out
in rows (``packing``) and ``write_rows`` writes the split's arrays (format in ``cache``).
"""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np

from affinage.data.packing import Layout, layout_bfd, layout_concat, layout_single, padding_fraction
from affinage.data.stats import length_stats
from affinage.hashing import int_hash


class SampleStore:
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
        """(ids, mask, offsets) as plain ndarray views of the mapped files (slicing a memmap costs more per piece)."""
        n = self.offsets[-1]
        ids = np.asarray(np.memmap(self.folder / "ids.bin", dtype=np.uint32, mode="r", shape=(n,))) if n else np.zeros(0, np.uint32)
        mask = np.asarray(np.memmap(self.folder / "mask.bin", dtype=np.uint8, mode="r", shape=(n,))) if n else np.zeros(0, np.uint8)
        return ids, mask, np.frombuffer(self.offsets, dtype=np.int64)


def pack_and_write(store: SampleStore, folder: Path, data, seed: int, split: str) -> dict:
    """Lay the store's samples out in rows (``data.packing``, seeded shuffles) and write the split; return its counts."""
    ids, mask, offsets = store.arrays()
    lengths = np.diff(offsets)
    uses = np.frombuffer(store.uses, dtype=np.int32).astype(np.int64)
    items = np.repeat(np.arange(len(lengths), dtype=np.int64), uses)  # a record of weight 2 is packed twice
    if data.shuffle and len(items):
        perm = np.random.default_rng(int_hash(f"{seed}/pack/{split}")).permutation(len(items))
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
    ids_view = np.asarray(out_ids) if total else None  # plain views: the memmaps are flushed below
    mask_view = np.asarray(out_mask) if total else None
    seq_offsets = np.zeros(n_seg + 1, dtype=np.int64)
    row_seq = np.zeros(n_rows + 1, dtype=np.int64)
    pos = seg = 0
    ro = layout.row_offsets.tolist()
    items, starts, lens = layout.item.tolist(), layout.start.tolist(), layout.length.tolist()
    for r in range(n_rows):
        for p in range(ro[r], ro[r + 1]):
            a = offsets[items[p]] + starts[p]
            n = lens[p]
            ids_view[pos : pos + n] = ids[a : a + n]
            mask_view[pos : pos + n] = mask[a : a + n]
            if not layout.merge_segments or p == ro[r]:
                mask_view[pos] = 0  # the first token of a segment is never a prediction target
                seq_offsets[seg] = pos
                seg += 1
            pos += n
        row_seq[r + 1] = seg
    seq_offsets[seg] = pos
    if total:
        out_ids.flush()
        out_mask.flush()
        loss_tokens = int(mask_view.sum(dtype=np.int64))
        del out_ids, out_mask, ids_view, mask_view
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
        "row_tokens": length_stats(row_len),
        "segments_per_row": round(n_seg / n_rows, 3) if n_rows else None,
    }
