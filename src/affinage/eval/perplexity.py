"""Perplexity and bits per byte of held-out texts.

Each text is scored as training sees a document: a BOS token (EOS when the tokenizer has no BOS),
then the text's tokens; every text token is predicted once (no EOS is scored, it has no bytes).
Texts longer than ``max_length`` are scored with sliding windows: the first window predicts its
``max_length - 1`` tokens, each next window moves by ``stride`` tokens and predicts only the new
ones, with the tokens before them as context (at least ``max_length - stride``).

Per text we keep the summed negative log-likelihood (nats), the number of tokens, UTF-8 bytes and
words; a set's figures come from the sums:

* ``token_perplexity = exp(nll / tokens)`` — depends on the tokenizer;
* ``bits_per_byte = nll / (ln 2 · bytes)`` — comparable across tokenizers (lm-eval's definition);
* ``word_perplexity = exp(nll / words)`` (whitespace words, as lm-eval).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from affinage.eval.scoring import encode, prefix_id, score_spans

LN2 = math.log(2)


@dataclass(frozen=True)
class TextScore:
    nll: float
    tokens: int
    bytes: int
    words: int

    def as_dict(self) -> dict:
        return asdict(self)


def windows(n_ids: int, max_length: int, stride: Optional[int] = None) -> list[tuple[int, int, int]]:
    """``(s, a, e)`` per window over a sequence of ``n_ids`` ids (position 0 is the prefix).

    The model reads ids ``[s, e)`` and the tokens ``[a, e)`` are scored; every position ``1..n-1``
    is scored exactly once and ``e - s <= max_length``.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    stride = stride or max(1, max_length // 2)
    if not 1 <= stride <= max_length - 1:
        stride = max_length - 1
    out = []
    e = min(max_length, n_ids)
    out.append((0, 1, e))
    while e < n_ids:
        a = e
        e = min(a + stride, n_ids)
        out.append((max(0, e - max_length), a, e))
    return out


def score_texts(model, tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int = 8,
                stride: Optional[int] = None, packed: bool = True, progress: bool = False,
                meter: Optional[dict] = None, desc: str = "perplexity") -> list[TextScore]:
    """One :class:`TextScore` per text; its windows are packed into rows of ``max_length`` (``scoring``)."""
    prefix = prefix_id(tokenizer)
    requests, owner = [], []
    for t, text in enumerate(texts):
        ids = ([prefix] if prefix is not None else []) + encode(tokenizer, text)
        if len(ids) < 2:
            continue
        for s, a, e in windows(len(ids), max_length, stride):
            requests.append((ids[s:e], a - s))
            owner.append(t)
    scores = score_spans(model, requests, batch_size=batch_size, max_length=max_length, packed=packed,
                         progress=progress, desc=desc, meter=meter)
    nll = [0.0] * len(texts)
    toks = [0] * len(texts)
    for t, sc in zip(owner, scores):
        nll[t] -= sc.logprob
        toks[t] += sc.tokens
    return [TextScore(nll[i], toks[i], len(text.encode("utf-8")), len(text.split())) for i, text in enumerate(texts)]


def aggregate(scores: Sequence[TextScore]) -> dict:
    """Set-level figures from per-text sums (see the module docstring)."""
    nll = sum(s.nll for s in scores)
    tokens = sum(s.tokens for s in scores)
    nbytes = sum(s.bytes for s in scores)
    words = sum(s.words for s in scores)
    return {
        "documents": len(scores),
        "tokens": tokens,
        "bytes": nbytes,
        "words": words,
        "nll": nll,
        "token_perplexity": math.exp(nll / tokens) if tokens else None,
        "bits_per_byte": nll / (LN2 * nbytes) if nbytes else None,
        "word_perplexity": math.exp(min(nll / words, 700)) if words else None,
    }
