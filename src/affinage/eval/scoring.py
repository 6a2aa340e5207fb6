"""Log-likelihood of token spans under a causal LM: the one primitive perplexity and MCQ share.

A request is ``(ids, start)``: the model reads ``ids`` and we sum ``log p(ids[k] | ids[:k])`` for
``k`` in ``[start, len(ids))``. Requests are sorted by length and batched with right padding and
an attention mask (padding after the last real token cannot change a causal model's earlier
logits). Log-softmax is taken in float32 on the scored positions only, so memory stays at one
batch of logits whatever the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SpanScore:
    logprob: float  # natural log, summed over the scored tokens
    tokens: int     # number of scored tokens
    greedy: bool    # every scored token was the model's most likely next token


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-free stand-in (tests)
        return torch.device("cpu")


@torch.no_grad()
def score_spans(model, requests: Sequence[tuple[Sequence[int], int]], batch_size: int = 8) -> list[SpanScore]:
    """Score every request; results are in the order of ``requests``."""
    for ids, start in requests:
        if not 1 <= start <= len(ids):
            raise ValueError(f"start {start} must be in [1, {len(ids)}] (the first token has no context)")
    device = model_device(model)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out: list[SpanScore | None] = [None] * len(requests)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for b in range(0, len(order), batch_size):
            chunk = order[b : b + batch_size]
            width = len(requests[chunk[0]][0])
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                seq = torch.as_tensor(list(requests[i][0]), dtype=torch.long)
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for row, i in enumerate(chunk):
                seq, start = requests[i]
                n = len(seq)
                if start == n:
                    out[i] = SpanScore(0.0, 0, True)
                    continue
                lp = torch.log_softmax(logits[row, start - 1 : n - 1].float(), dim=-1)
                target = ids[row, start:n].to(lp.device)
                picked = lp.gather(-1, target[:, None])[:, 0]
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = SpanScore(float(picked.sum()), n - start, greedy)
    finally:
        if was_training:
            model.train()
    return out  # type: ignore[return-value]


def prefix_id(tokenizer) -> int | None:
    """The token a document starts with: BOS like affinage's training (``data.tokenize.document_ids``), else EOS."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return None


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
