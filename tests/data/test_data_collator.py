"""PackedCollator: labels from the loss mask, built once; the same batch as transformers' flattening collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from affinage.data.collator import IGNORE_INDEX as X
from affinage.data.collator import PackedCollator
from affinage.data.errors import DataError
from affinage.data.templates import TokenizedSample


def rows(seed: int = 0, n_rows: int = 3):
    """Cache-like rows of several segments, random ids and masks, first token of each segment unmasked."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_rows):
        seq = rng.integers(2, 40, size=rng.integers(1, 5))
        n = int(seq.sum())
        mask = (rng.random(n) > 0.4).astype(np.uint8)
        mask[np.cumsum(seq) - seq] = 0
        out.append({"input_ids": rng.integers(0, 5000, n).astype(np.uint32), "loss_mask": mask, "seq_lens": seq})
    return out


def test_flattened_batch_equals_transformers_data_collator_with_flattening():
    """The docstring's claim: same keys, identical tensors, given the rows' segments as features."""
    from transformers import DataCollatorWithFlattening

    batch_rows = rows(1, 4)
    segments = []
    for r in batch_rows:
        pos = 0
        for n in r["seq_lens"]:
            ids = r["input_ids"][pos : pos + n].astype(np.int64)
            segments.append({"input_ids": ids, "labels": np.where(r["loss_mask"][pos : pos + n] > 0, ids, X)})
            pos += n
    ours = PackedCollator(pad_token_id=0)(batch_rows)
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(segments)
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == theirs[k].dtype and torch.equal(v, theirs[k]), k
        else:
            assert v == theirs[k], k
    assert int((ours["labels"] != X).sum()) == sum(int(r["loss_mask"].sum()) for r in batch_rows)


def test_samples_are_one_segment_each_and_their_first_token_carries_no_loss():
    batch = PackedCollator(pad_token_id=0)([
        TokenizedSample([5, 6, 7, 8], [True, False, True, True]),
        {"input_ids": [9, 10], "loss_mask": [False, True]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["labels"].tolist() == [[X, X, 7, 8, X, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 6]


def test_refuses_batches_it_cannot_train_on():
    with pytest.raises(DataError, match="batch has no loss-bearing token"):
        PackedCollator(pad_token_id=0)([TokenizedSample([5, 6], [False, False]), TokenizedSample([7], [True])])
    PackedCollator(pad_token_id=0, task="cpt")([TokenizedSample([5, 6], [False, False])])  # cpt: no check
    with pytest.raises(DataError, match="3 input_ids but a loss mask of 2"):
        PackedCollator(pad_token_id=0)([{"input_ids": [1, 2, 3], "loss_mask": [True, True]}])
    with pytest.raises(DataError, match="empty batch"):
        PackedCollator(pad_token_id=0)([])
