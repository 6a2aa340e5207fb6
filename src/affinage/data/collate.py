"""Batch tokenized samples for the Trainer, and refuse batches whose loss mask is clearly wrong.

The checks exist because a broken mask fails silently: a batch with no loss-bearing token
trains nothing, and a mask covering every token means the template spans were not found and
the model would learn to write the user's turns too.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from affinage.data.errors import DataError
from affinage.data.templates import IGNORE_INDEX


class LossMaskCollator:
    """Right-pad ``input_ids`` (pad id) and ``labels`` (-100), build ``attention_mask``; return tensors.

    For ``task="sft"`` each batch must have at least one loss-bearing token and at least one
    non-pad token without loss (the prompt); ``task="cpt"`` trains on every token, so no check.
    """

    def __init__(
        self,
        tokenizer=None,
        task: str = "sft",
        pad_token_id: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
    ):
        if task not in ("sft", "cpt"):
            raise ValueError(f"task must be 'sft' or 'cpt' (got {task!r})")
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise DataError("no pad id: the tokenizer has neither a pad token nor an EOS token; pass pad_token_id")
        self.pad_token_id = int(pad_token_id)
        self.task = task
        self.pad_to_multiple_of = pad_to_multiple_of

    @staticmethod
    def _fields(f: Any) -> tuple[Sequence[int], Sequence[int]]:
        if isinstance(f, Mapping):
            ids = f["input_ids"]
            labels = f.get("labels", ids)
        else:
            ids = f.input_ids
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, f.loss_mask)]
        ids, labels = list(ids), list(labels)
        if len(ids) != len(labels):
            raise DataError(f"sample has {len(ids)} input_ids but {len(labels)} labels")
        return ids, labels

    def __call__(self, features: Sequence[Any]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("empty batch")
        pairs = [self._fields(f) for f in features]
        width = max(len(ids) for ids, _ in pairs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(pairs)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for row, (ids, lab) in enumerate(pairs):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
            attention[row, : len(ids)] = 1
        if self.task == "sft":
            loss = labels != IGNORE_INDEX
            real = attention.bool()
            if not loss.any():
                raise DataError(
                    "batch has no loss-bearing token (every label is -100): the assistant turns were truncated away or "
                    "never found; raise data.max_length or check the chat template"
                )
            if bool((loss == real).all()):
                raise DataError(
                    "the loss mask covers the whole sequence (every non-pad token is loss-bearing) in an sft batch: the "
                    "prompt would be trained on too. This is a template/masking problem; refusing to train silently on "
                    "full sequences (use task: cpt for raw text)"
                )
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
