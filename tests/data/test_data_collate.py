"""LossMaskCollator: right padding, attention mask, and refusal of wrong loss masks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from affinage.data.collate import LossMaskCollator
from affinage.data.errors import DataError
from affinage.data.templates import IGNORE_INDEX as X
from affinage.data.templates import TokenizedSample

TOK = SimpleNamespace(pad_token_id=0, eos_token_id=2)


def test_right_padding_labels_and_attention():
    batch = LossMaskCollator(TOK)(
        [
            TokenizedSample([5, 6, 7, 8], [False, False, True, True]),
            {"input_ids": [9, 10], "labels": [X, 10]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, 7, 8], [X, 10, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_falls_back_to_eos_and_multiple_of():
    c = LossMaskCollator(SimpleNamespace(pad_token_id=None, eos_token_id=2), pad_to_multiple_of=4)
    batch = c([TokenizedSample([5, 6, 7, 8, 9], [False, False, False, True, True])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2, 2, 2]]
    assert batch["labels"].tolist() == [[X, X, X, 8, 9, X, X, X]]
    with pytest.raises(DataError, match="no pad id"):
        LossMaskCollator(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_sft_batch_without_loss_tokens_raises():
    c = LossMaskCollator(TOK, task="sft")
    with pytest.raises(DataError, match="batch has no loss-bearing token"):
        c([TokenizedSample([5, 6], [False, False]), TokenizedSample([7], [False])])


def test_sft_batch_with_full_loss_mask_raises():
    c = LossMaskCollator(TOK, task="sft")
    with pytest.raises(DataError, match="loss mask covers the whole sequence"):
        c([TokenizedSample([5, 6, 7], [True, True, True]), TokenizedSample([8], [True])])
    # one prompt token anywhere in the batch is enough
    c([TokenizedSample([5, 6, 7], [True, True, True]), TokenizedSample([8, 9], [False, True])])


def test_cpt_has_no_mask_check_and_labels_default_to_ids():
    c = LossMaskCollator(TOK, task="cpt")
    batch = c([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert batch["labels"].tolist() == [[5, 6, 7], [8, X, X]]


def test_mismatched_lengths_rejected():
    with pytest.raises(DataError, match="3 input_ids but 2 labels"):
        LossMaskCollator(TOK)([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
