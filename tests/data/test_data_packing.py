"""Packing layouts (best-fit decreasing, concat) and the padding-free collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from affinage.data.collator import PackedCollator
from affinage.data.packing import best_fit_decreasing, layout_bfd, layout_concat, padding_fraction


def first_fit_rows(lengths, cap):
    free = []
    for n in lengths:
        for i, f in enumerate(free):
            if f >= n:
                free[i] -= n
                break
        else:
            free.append(cap - n)
    return len(free)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfd_places_every_item_within_capacity_and_beats_first_fit(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 400, size=2000)
    cap = 1024
    row_of = best_fit_decreasing(lengths, cap)
    loads = np.bincount(row_of, weights=lengths)
    assert loads.max() <= cap
    assert loads.sum() == lengths.sum()
    assert len(loads) <= first_fit_rows(lengths.tolist(), cap)
    assert len(loads) <= int(np.ceil(lengths.sum() / cap) * 1.02) + 1  # within 2 % of the lower bound
    # rows are full but for the last few: best fit leaves little space
    assert padding_fraction(loads, cap) < 0.02


def test_bfd_exact_fit_and_errors():
    assert best_fit_decreasing([6, 4, 5, 5], 10).tolist() == [0, 0, 1, 1]  # 6+4 and 5+5
    with pytest.raises(ValueError):
        best_fit_decreasing([11], 10)
    lay = layout_bfd([3, 7, 2, 8], 10)
    assert sorted(lay.row_lengths().tolist()) == [10, 10]


def test_concat_cuts_rows_of_exact_length():
    lay = layout_concat([5, 12, 3], 8)
    assert lay.row_lengths().tolist() == [8, 8, 4]
    assert lay.item.tolist() == [0, 1, 1, 1, 2]
    assert lay.start.tolist() == [0, 0, 3, 11, 0]


def test_collator_padding_free_and_padded():
    rows = [
        {"input_ids": np.array([1, 2, 3, 4, 5]), "loss_mask": np.array([0, 0, 1, 0, 1], np.uint8), "seq_lens": np.array([3, 2])},
        {"input_ids": np.array([6, 7, 8]), "loss_mask": np.array([0, 1, 1], np.uint8), "seq_lens": np.array([3])},
    ]
    flat = PackedCollator(pad_token_id=0)(rows)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert flat["labels"].tolist() == [[-100, -100, 3, -100, 5, -100, 7, 8]]
    assert flat["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and flat["max_length_q"] == 3
    padded = PackedCollator(pad_token_id=0, flatten=False)(rows)
    assert padded["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert padded["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert padded["labels"][1].tolist() == [-100, 7, 8, -100, -100]
    assert "attention_mask" not in padded  # transformers derives the block-diagonal mask from position_ids
    with pytest.raises(Exception, match="no loss-bearing token"):
        PackedCollator(pad_token_id=0)([{"input_ids": np.array([1, 2]), "loss_mask": np.array([0, 0]), "seq_lens": np.array([2])}])
    assert isinstance(flat["input_ids"], torch.Tensor) and flat["input_ids"].dtype == torch.long
