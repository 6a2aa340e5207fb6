"""Log-likelihood of token spans under a causal LM: the one primitive perplexity and MCQ share.

A request is ``(ids, start)``: the model reads ``ids`` and we sum ``log p(ids[k] | ids[:k])`` for
``k`` in ``[start, len(ids))``.

Packed (the default, as training runs): requests are laid out best-fit-decreasing into rows of
``max_length`` tokens (``data.packing.layout_bfd``), each request its own segment; a row goes
through ``data.collator.PackedCollator`` (padding-free, positions restarting per segment,
``cu_seq_lens``) and one forward, with the varlen attention the trainer uses
(``train.attention.use_varlen_attention``) so no segment sees another, and the head applied only at the
scored positions (``logits_to_keep``, as ``train.loss.selective_lm_loss``). No pad token is
computed on. Unpacked (``packed=False``, the reference the tests compare with): requests sorted by
length and batched with right padding and an attention mask. Either way log-softmax is taken in
float32 on the scored positions only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from affinage.data.collator import IGNORE_INDEX as IGNORE


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


def _check(requests) -> None:
    for ids, start in requests:
        if not 1 <= start <= len(ids):
            raise ValueError(f"start {start} must be in [1, {len(ids)}] (the first token has no context)")


def score_spans(model, requests: Sequence[tuple[Sequence[int], int]], batch_size: int = 8, *,
                max_length: Optional[int] = None, packed: bool = True, progress: bool = False,
                desc: str = "score", meter: Optional[dict] = None) -> list[SpanScore]:
    """Score every request; results are in the order of ``requests``.

    Packed into rows of ``max_length`` (default: the longest request) unless ``packed=False``.
    ``meter``, when given, is filled with ``tokens`` (read by the model), ``scored``, ``forwards``
    and ``seconds``: what the tokens/s of the console summary and results.json come from.
    """
    _check(requests)
    t0 = time.monotonic()
    if packed and requests:
        width = max(len(r[0]) for r in requests)
        out, forwards = _score_packed(model, requests, max(max_length or width, width), progress=progress, desc=desc)
    else:
        out, forwards = _score_padded(model, requests, batch_size)
    if meter is not None:
        meter["tokens"] = meter.get("tokens", 0) + sum(len(r[0]) for r in requests)
        meter["scored"] = meter.get("scored", 0) + sum(s.tokens for s in out)
        meter["forwards"] = meter.get("forwards", 0) + forwards
        meter["seconds"] = meter.get("seconds", 0.0) + time.monotonic() - t0
    return out


def tokens_per_s(meter: dict) -> Optional[float]:
    """Tokens read by the model per second of scoring (None before any)."""
    return meter["tokens"] / meter["seconds"] if meter.get("seconds") else None


class _EvalMode:
    """Model in eval mode, and varlen attention when the architecture allows it; both restored after."""

    def __init__(self, model, max_length: Optional[int] = None, varlen: bool = False):
        self.model, self.max_length, self.varlen = model, max_length, varlen

    def __enter__(self):
        self.was_training = getattr(self.model, "training", False)
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.restore = None
        if self.varlen:
            from affinage.train.attention import base_model, use_varlen_attention

            base = base_model(self.model)
            config = getattr(base, "config", None)
            if config is not None and hasattr(base, "set_attn_implementation"):
                before = getattr(config, "_attn_implementation", None)
                if use_varlen_attention(self.model, self.max_length) != before:
                    self.restore = (base, before)
        return self

    def __exit__(self, *exc):
        if self.restore is not None:
            base, before = self.restore
            base.set_attn_implementation(before)
        if self.was_training:
            self.model.train()


@torch.no_grad()
def _score_packed(model, requests, max_length: int, *, progress: bool, desc: str) -> tuple[list[SpanScore], int]:
    from affinage.data.collator import PackedCollator
    from affinage.data.packing import layout_bfd
    from affinage.train.loss import _accepts_logits_to_keep

    device = model_device(model)
    layout = layout_bfd([len(r[0]) for r in requests], max_length)
    collate = PackedCollator(pad_token_id=0, task="cpt", flatten=True)
    keep_ok = _accepts_logits_to_keep(model)
    out: list[SpanScore | None] = [None] * len(requests)
    rows = range(layout.num_rows)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=desc, unit=" row", dynamic_ncols=True)
    with _EvalMode(model, max_length, varlen=True):
        for r in rows:
            members = layout.item[layout.row_offsets[r]: layout.row_offsets[r + 1]].tolist()
            ids = np.concatenate([np.asarray(requests[i][0], dtype=np.int64) for i in members])
            mask = np.concatenate([np.arange(len(requests[i][0])) >= requests[i][1] for i in members])
            seq = [len(requests[i][0]) for i in members]
            batch = collate([{"input_ids": ids, "loss_mask": mask, "seq_lens": seq}])
            labels = batch.pop("labels")[0]
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            target_pos = (labels[1:] != IGNORE).nonzero().squeeze(-1)  # position t predicts token t+1
            if keep_ok:
                logits = model(**batch, logits_to_keep=target_pos.to(device), use_cache=False).logits[0]
            else:
                logits = model(**batch, use_cache=False).logits[0, target_pos.to(device)]
            lp = torch.log_softmax(logits.float(), dim=-1)
            target = labels[target_pos + 1].to(lp.device)
            picked = lp.gather(-1, target[:, None])[:, 0]
            hit = lp.argmax(-1) == target
            # the scored positions are in row order, so each request's are one contiguous run
            k = 0
            for i in members:
                n = len(requests[i][0]) - requests[i][1]
                out[i] = SpanScore(float(picked[k: k + n].sum()), n, bool(hit[k: k + n].all()))
                k += n
    return out, layout.num_rows  # type: ignore[return-value]


@torch.no_grad()
def _score_padded(model, requests, batch_size: int) -> tuple[list[SpanScore], int]:
    device = model_device(model)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out: list[SpanScore | None] = [None] * len(requests)
    forwards = 0
    with _EvalMode(model):
        for b in range(0, len(order), batch_size):
            forwards += 1
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
    return out, forwards  # type: ignore[return-value]


def prefix_id(tokenizer) -> int | None:
    """The token a document starts with: BOS like affinage's training (``data.tokenize.document_ids``), else EOS."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return None


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
