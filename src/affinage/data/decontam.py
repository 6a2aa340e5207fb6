"""Decontamination: training documents that share a long word n-gram with an evaluation file.

Evaluation files are read with the same readers and formats as training sources (text, chat or
alpaca; every turn is an evaluation text). Texts are compared as lower-cased word sequences
(``filters.words``): an n-gram (default 13 words, as GPT-3) shared with any evaluation text flags the
training document. Evaluation texts shorter than ``n`` words but of at least ``MIN_WHOLE_WORDS``
words are matched whole; shorter ones (one-word answers) cannot be told apart from ordinary
French and are counted as unchecked. N-grams never straddle two chat turns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from affinage.data.errors import DataError, SkipCounter
from affinage.data.filters import document_parts, words
from affinage.data.formats import convert, detect_format

MIN_WHOLE_WORDS = 8


@dataclass
class Contamination:
    """What one training document shares with the evaluation files."""

    eval_files: list[str]
    ngram: str


@dataclass
class EvalIndex:
    n: int
    files: list[str]
    grams: dict[int, dict[int, int]] = field(default_factory=dict)  # length -> {hash(gram): file index}
    texts: int = 0
    unchecked_short: int = 0

    def add_text(self, text: str, file_idx: int) -> None:
        w = words(text)
        self.texts += 1
        if len(w) >= self.n:
            table = self.grams.setdefault(self.n, {})
            for i in range(len(w) - self.n + 1):
                table.setdefault(hash(tuple(w[i : i + self.n])), file_idx)
        elif len(w) >= MIN_WHOLE_WORDS:
            self.grams.setdefault(len(w), {}).setdefault(hash(tuple(w)), file_idx)
        else:
            self.unchecked_short += 1

    def check(self, record: dict) -> Optional[Contamination]:
        """The first shared n-gram of ``record`` and the evaluation files it comes from, or None."""
        for part in document_parts(record):
            w = words(part)
            for k, table in self.grams.items():
                for i in range(len(w) - k + 1):
                    j = table.get(hash(tuple(w[i : i + k])))
                    if j is not None:
                        return Contamination([self.files[j]], " ".join(w[i : i + k]))
        return None

    def summary(self) -> dict:
        return {
            "eval_files": self.files,
            "ngram": self.n,
            "eval_texts": self.texts,
            "eval_texts_too_short_to_check": self.unchecked_short,
            "eval_ngrams": sum(len(t) for t in self.grams.values()),
        }


def build_eval_index(spec) -> EvalIndex:
    """Index the n-grams of ``spec.eval_files`` (a ``DecontaminationSpec``)."""
    from affinage.data.readers import read_source
    from affinage.recipe.schema import SourceSpec

    index = EvalIndex(n=spec.ngram, files=[str(f) for f in spec.eval_files])
    for j, path in enumerate(spec.eval_files):
        src = SourceSpec(path=str(path))
        skips = SkipCounter()
        fmt = None
        n = 0
        for raw in read_source(src, "skip", skips):
            try:
                if fmt is None:
                    fmt = detect_format(raw.data, src.text_field, src.messages_field, raw.where)
                record = convert(raw, src, fmt)
            except DataError:
                continue
            for part in document_parts(record):
                index.add_text(part, j)
            n += 1
        if n == 0:
            raise DataError(f"decontamination: evaluation file {path} gave no usable record ({Path(path)})")
    return index
