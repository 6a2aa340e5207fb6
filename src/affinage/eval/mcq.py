"""Multiple-choice accuracy by log-likelihood, with lm-evaluation-harness's conventions.

For an item, the context is the few-shot examples then ``template`` filled with the question
(``"Question : …\\nRéponse :"`` by default); each choice is scored as the continuation
``" " + choice`` (lm-eval's ``target_delimiter``). Like lm-eval's ``_encode_pair``, trailing
spaces of the context move to the continuation, the whole string is tokenized once and the
continuation's tokens are those after the context's. The sequence starts with BOS (EOS when
there is none), as in affinage's training; contexts too long for ``max_length`` lose their oldest
tokens.

Per item, with ``ll[i]`` the summed log-probability of choice ``i``:

* ``acc``: ``argmax ll[i]`` is the answer (lm-eval ``acc``);
* ``acc_norm``: ``argmax ll[i] / len(choice_i)`` — length in characters of the choice text, exactly
  what lm-eval's code does (``len(choice)``); it is the "byte-length normalisation" of
  Gao (2021) for ASCII text;
* ``acc_norm_bytes``: the same with the UTF-8 byte length (differs for accented French).

Ties go to the first choice (``numpy.argmax``). Few-shot examples are drawn, seeded per item, from
``fewshot_items`` or from the same set without the item itself; each shows its right answer.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

from affinage.eval.scoring import encode, prefix_id, score_spans
from affinage.eval.sets import McqItem

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def fewshot_prefix(item_index: int, items: Sequence[McqItem], k: int, template: str, *,
                   pool: Optional[Sequence[McqItem]] = None, seed: int = 1234, set_name: str = "") -> str:
    """The ``k`` solved examples put before item ``item_index`` (empty for zero-shot)."""
    if k == 0:
        return ""
    same = pool is None
    pool = items if pool is None else pool
    candidates = [j for j in range(len(pool)) if not (same and j == item_index)]
    if len(candidates) < k:
        raise ValueError(f"{k}-shot needs at least {k} other items, the pool has {len(candidates)}")
    picked = random.Random(f"{seed}/{set_name}/{item_index}").sample(candidates, k)
    shots = [pool[j] for j in picked]
    return "".join(
        template.format(question=s.question) + TARGET_DELIMITER + s.choices[s.answer] + FEWSHOT_DELIMITER for s in shots
    )


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return whole[: len(ctx)], whole[len(ctx):]


def build_requests(tokenizer, items: Sequence[McqItem], *, template: str, num_fewshot: int = 0,
                   pool: Optional[Sequence[McqItem]] = None, max_length: int = 2048, seed: int = 1234,
                   set_name: str = "") -> tuple[list[tuple[list[int], int]], list[str]]:
    """One ``(ids, start)`` request per (item, choice), in item then choice order, and the contexts."""
    prefix = prefix_id(tokenizer)
    requests, contexts = [], []
    for i, item in enumerate(items):
        context = fewshot_prefix(i, items, num_fewshot, template, pool=pool, seed=seed, set_name=set_name) \
            + template.format(question=item.question)
        contexts.append(context)
        for choice in item.choices:
            ctx, cont = encode_pair(tokenizer, context, TARGET_DELIMITER + choice)
            if not cont:
                raise ValueError(f"{item.where}: choice {choice!r} encodes to no token")
            ids = ([prefix] if prefix is not None else []) + ctx + cont
            start = len(ids) - len(cont)
            if len(ids) > max_length:  # drop the oldest context, keep the whole continuation
                cut = len(ids) - max_length
                if cut >= start:
                    raise ValueError(f"{item.where}: choice {choice!r} alone is longer than max_length {max_length}")
                ids, start = ids[cut:], start - cut
            if start < 1:  # no prefix token: the continuation's first token needs a context
                raise ValueError(f"{item.where}: empty context")
            requests.append((ids, start))
    return requests, contexts


def score_items(model, tokenizer, items: Sequence[McqItem], *, template: str, num_fewshot: int = 0,
                pool: Optional[Sequence[McqItem]] = None, max_length: int = 2048, batch_size: int = 8,
                seed: int = 1234, set_name: str = "", packed: bool = True, progress: bool = False,
                meter: Optional[dict] = None) -> list[dict]:
    """Per item: log-likelihoods of the choices, predictions and the three correctness flags.

    The (item, choice) sequences are packed into rows of ``max_length`` and scored together (``scoring``).
    """
    requests, _ = build_requests(tokenizer, items, template=template, num_fewshot=num_fewshot, pool=pool,
                                 max_length=max_length, seed=seed, set_name=set_name)
    scores = score_spans(model, requests, batch_size=batch_size, max_length=max_length, packed=packed,
                         progress=progress, desc=f"mcq {set_name}".strip(), meter=meter)
    out, k = [], 0
    for item in items:
        lls = [s.logprob for s in scores[k : k + len(item.choices)]]
        k += len(item.choices)
        pred = _argmax(lls)
        pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, item.choices)])
        pred_bytes = _argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, item.choices)])
        out.append({
            "where": item.where,
            "loglikelihoods": lls,
            "prediction": pred,
            "prediction_norm": pred_norm,
            "answer": item.answer,
            "acc": float(pred == item.answer),
            "acc_norm": float(pred_norm == item.answer),
            "acc_norm_bytes": float(pred_bytes == item.answer),
        })
    return out


def aggregate(per_item: Sequence[dict]) -> dict:
    n = len(per_item)
    return {
        "items": n,
        **{m: (sum(r[m] for r in per_item) / n if n else None) for m in ("acc", "acc_norm", "acc_norm_bytes")},
    }
