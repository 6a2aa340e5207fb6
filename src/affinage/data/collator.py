"""Rows of the prepared-data cache as Trainer batches (torch): the one place labels are built.

``PackedDataset`` serves the rows of a ``cache.PackedSplit``; ``PackedCollator`` turns a micro-batch
of rows into model inputs where no sample can see another:

* padding-free (default): the rows are concatenated into one sequence ``[1, tokens]`` with
  ``position_ids`` restarting at every segment and ``cu_seq_lens_q/k`` (cumulative segment
  lengths) + ``max_length_q/k``. Flash-attention (varlen) uses them directly on GPU; on CPU
  ``affinage.train.loss`` registers an attention that runs causal SDPA on each segment; any other
  attention in transformers 5 builds a block-diagonal mask from the restarting ``position_ids``.
  No pad token is computed on.
* padded (``flatten=False``): rows right-padded to the longest row of the batch; the padding is one
  more segment (positions restart) with label -100, and there is no ``attention_mask`` so that
  transformers derives the block-diagonal mask from ``position_ids``.

The loss mask comes as a mask from the template to here (``loss_mask`` of a row or of a
``templates.TokenizedSample``); labels are the token ids where it is set, else ``IGNORE_INDEX``.

Why not ``transformers.DataCollatorWithFlattening``: given the rows' segments as features it
returns the same keys and identical tensors (``return_flash_attn_kwargs=True``; tested in
``tests/data/test_data_collator.py``), but it walks every token in Python lists: 16 ms against
0.6 ms here for a 16k-token batch (8 rows of 2048, measured on this project's 2-core CPU). The
Trainer collates in its main process by default, so on a GPU with a small model that is most of a
step. It also needs the rows cut back into one feature per segment with labels built first, and
has no padded form.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from affinage.data.errors import DataError

IGNORE_INDEX = -100  # the label of a token that carries no loss (PyTorch's cross-entropy default)


class PackedDataset(torch.utils.data.Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        return self.split[i]


def _positions(seq_lens: np.ndarray) -> np.ndarray:
    """0..n-1 for each segment length n, concatenated."""
    total = int(seq_lens.sum())
    starts = np.repeat(np.cumsum(seq_lens) - seq_lens, seq_lens)
    return np.arange(total, dtype=np.int64) - starts


class PackedCollator:
    def __init__(self, pad_token_id: int, task: str = "sft", flatten: bool = True):
        if task not in ("sft", "cpt"):
            raise ValueError(f"task must be 'sft' or 'cpt' (got {task!r})")
        self.pad_token_id = int(pad_token_id)
        self.task = task
        self.flatten = flatten

    @staticmethod
    def _row(f: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, mask, segment lengths) of a cache row, or of one sample (one segment; its first token carries no loss)."""
        if isinstance(f, Mapping):
            ids = np.asarray(f["input_ids"], dtype=np.int64)
            mask = np.asarray(f["loss_mask"], dtype=bool)
            seq = f.get("seq_lens")
        else:
            ids = np.asarray(f.input_ids, dtype=np.int64)
            mask = np.asarray(f.loss_mask, dtype=bool)
            seq = None
        if len(mask) != len(ids):
            raise DataError(f"sample has {len(ids)} input_ids but a loss mask of {len(mask)}")
        if seq is None:
            mask = mask.copy()
            mask[:1] = False
            seq = [len(ids)]
        return ids, mask, np.asarray(seq, dtype=np.int64)

    def __call__(self, features: Sequence[Any]) -> dict:
        if not features:
            raise DataError("empty batch")
        rows = [self._row(f) for f in features]
        if self.task == "sft" and not any(m.any() for _, m, _ in rows):
            raise DataError(
                "batch has no loss-bearing token (every label is -100): the assistant turns were truncated away or "
                "never found; raise data.max_length or check the chat template"
            )
        if self.flatten:
            ids = np.concatenate([r[0] for r in rows])
            mask = np.concatenate([r[1] for r in rows])
            seq = np.concatenate([r[2] for r in rows])
            labels = np.where(mask, ids, IGNORE_INDEX)
            cu = np.concatenate([[0], np.cumsum(seq)]).astype(np.int32)
            cu_t = torch.from_numpy(cu)
            return {
                "input_ids": torch.from_numpy(ids)[None],
                "labels": torch.from_numpy(labels)[None],
                "position_ids": torch.from_numpy(_positions(seq))[None],
                "cu_seq_lens_q": cu_t,
                "cu_seq_lens_k": cu_t,
                "max_length_q": int(seq.max()),
                "max_length_k": int(seq.max()),
            }
        width = max(len(r[0]) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        for i, (ids, mask, seq) in enumerate(rows):
            L = len(ids)
            input_ids[i, :L] = torch.from_numpy(ids)
            labels[i, :L] = torch.from_numpy(np.where(mask, ids, IGNORE_INDEX))
            position_ids[i, :L] = torch.from_numpy(_positions(seq))
            position_ids[i, L:] = torch.arange(width - L)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
