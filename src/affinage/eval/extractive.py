"""Extractive question answering (FQuAD / PIAF / SQuAD style): exact match and F1 of a greedy answer.

An item is ``{"context": str, "question": str, "answers": [str, ...]}`` (``answers`` may also be
the SQuAD/Hub layout ``{"text": [...], "answer_start": [...]}``, or one string; field names can be
mapped). The model reads ``template`` filled with context and question and writes greedily
(``eval.generation.generate``); the answer is what it writes up to the first newline (lm-eval's
``until: ["\\n"]`` for french_bench's FQuAD tasks).

Scoring is SQuAD's (Rajpurkar et al., 2016) with French articles, as french_bench's
``normalize_answer``: lower case, punctuation removed, the articles ``un une des le la les``
removed, whitespace collapsed. ``exact``: the normalised answer equals a normalised gold answer;
``f1``: token-overlap F1 with a gold answer. Both take the best over the gold answers (SQuAD's
and FQuAD's evaluation script); lm-eval's french_bench compares with the first gold answer only, so
on items with several golds our figures can be higher (never lower).
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass
from typing import Optional, Sequence

from affinage.data.errors import DataError
from affinage.data.formats import nfc

DEFAULT_TEMPLATE = "Contexte : {context}\n\nQuestion : {question}\n\nRéponse :"
_ARTICLES = re.compile(r"\b(un|une|des|le|la|les)\b", re.UNICODE)
_PUNCT = set(string.punctuation) | set("«»’“”…–—")


@dataclass(frozen=True)
class QaItem:
    context: str
    question: str
    answers: tuple[str, ...]
    where: str
    group: Optional[str] = None


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    return max(_f1(prediction, g) for g in golds)


def _answers(value, where: str, field: str) -> tuple[str, ...]:
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a.strip() for a in value):
        raise DataError(f"{where}: {field!r} must be a non-empty list of answer strings (or {{'text': [...]}}, "
                        "the SQuAD layout); an unanswerable item has no place in an extractive set",
                        where=where, reason="bad answers")
    return tuple(nfc(a) for a in value)


def read_qa(path: str, max_items: Optional[int] = None, *, context_field: str = "context",
            question_field: str = "question", answers_field: str = "answers",
            group_field: Optional[str] = None) -> list[QaItem]:
    """Items of an extractive QA file, in file order, each with its file:line."""
    from affinage.eval.sets import _group, _records

    out: list[QaItem] = []
    for rec in _records(path):
        d = rec.data
        for f in (context_field, question_field):
            if not isinstance(d.get(f), str) or not d[f].strip():
                raise DataError(f"{rec.where}: no {f!r} text (keys: {', '.join(sorted(d)) or 'none'}); map the field "
                                "with context_field / question_field", where=rec.where, reason="no field")
        if answers_field not in d:
            raise DataError(f"{rec.where}: no {answers_field!r} (keys: {', '.join(sorted(d))}); map it with answers_field",
                            where=rec.where, reason="no field")
        out.append(QaItem(nfc(d[context_field]), nfc(d[question_field]), _answers(d[answers_field], rec.where, answers_field),
                          rec.where, _group(rec, group_field)))
        if max_items and len(out) >= max_items:
            break
    if not out:
        raise DataError(f"extractive QA file {path} holds no item", where=str(path), reason="empty")
    return out


def first_line(text: str) -> str:
    """The answer as lm-eval's ``until: ["\\n"]`` keeps it."""
    return text.lstrip(" ").split("\n", 1)[0].strip()


def score_items(model, tokenizer, items: Sequence[QaItem], *, template: str = DEFAULT_TEMPLATE,
                max_new_tokens: int = 32, max_length: Optional[int] = None, seed: int = 1234) -> list[dict]:
    """Per item: the answer written, exact match and F1 against the gold answers."""
    from affinage.eval.generation import generate

    prompts = [template.format(context=it.context, question=it.question) for it in items]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed, max_length=max_length)
    return [score_answer(it, out) for it, out in zip(items, outputs)]


def score_answer(item: QaItem, output: str) -> dict:
    answer = first_line(output)
    return {"where": item.where, "answer": answer, "golds": list(item.answers),
            "exact": exact_match(answer, item.answers), "f1": f1_score(answer, item.answers)}


def aggregate(per_item: Sequence[dict]) -> dict:
    n = len(per_item)
    return {"items": n, **{m: (sum(r[m] for r in per_item) / n if n else None) for m in ("exact", "f1")}}
