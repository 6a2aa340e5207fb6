"""Read evaluation sets: held-out texts, multiple-choice items, prompts.

The files are read with the same readers as training data (``.jsonl``/``.json``/``.parquet``, a
folder of ``.txt`` files), so a malformed line is reported as ``file:line`` with what to fix.
Multiple-choice items are JSON objects ``{"question": str, "choices": [str, ...], "answer": int}``
(``answer`` is the index of the right choice, from 0), the layout of lm-eval's multiple-choice tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from affinage.data.errors import DataError
from affinage.paths import expand
from affinage.data.formats import nfc
from affinage.data.readers import read_source


def _records(path: str, text_field: str = "text"):
    return read_source(SimpleNamespace(path=path, text_field=text_field))


# ---------------------------------------------------------------------------------- texts
def read_texts(path: str, text_field: str = "text", max_records: Optional[int] = None) -> list[str]:
    """The texts of a held-out file (NFC), in file order; empty texts are skipped."""
    texts: list[str] = []
    for rec in _records(path, text_field):
        value = rec.data.get(text_field)
        if not isinstance(value, str):
            raise DataError(
                f"{rec.where}: no text field {text_field!r} (keys: {', '.join(sorted(rec.data)) or 'none'}); "
                "set text_field in the evaluation set",
                where=rec.where, reason="no text field",
            )
        if value.strip():
            texts.append(nfc(value))
        if max_records and len(texts) >= max_records:
            break
    if not texts:
        raise DataError(f"evaluation file {path} holds no text", where=str(path), reason="empty")
    return texts


# -------------------------------------------------------------------------------- MCQ items
@dataclass(frozen=True)
class McqItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    where: str


def read_mcq(path: str, max_items: Optional[int] = None) -> list[McqItem]:
    """Multiple-choice items; each bad item is an error naming its line and the fix."""
    items: list[McqItem] = []
    for rec in _records(path):
        d = rec.data
        q, choices, answer = d.get("question"), d.get("choices"), d.get("answer")
        problem = None
        if not isinstance(q, str) or not q.strip():
            problem = "'question' must be a non-empty string"
        elif not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            problem = "'choices' must be a list of at least two non-empty strings"
        elif isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            problem = f"'answer' must be the index (0 to {len(choices) - 1}) of the right choice, got {answer!r}"
        if problem:
            raise DataError(
                f'{rec.where}: {problem}. Items look like {{"question": "...", "choices": ["...", "..."], "answer": 0}}',
                where=rec.where, reason="bad MCQ item",
            )
        items.append(McqItem(nfc(q.strip()), tuple(nfc(c.strip()) for c in choices), int(answer), rec.where))
        if max_items and len(items) >= max_items:
            break
    if not items:
        raise DataError(f"multiple-choice file {path} holds no item", where=str(path), reason="empty")
    return items


# ---------------------------------------------------------------------------------- prompts
def read_prompts(prompts: list[str], path: Optional[str]) -> list[str]:
    """Prompts written in the recipe, then those of ``path`` (.jsonl with 'prompt', or .txt, one per line)."""
    out = [nfc(p) for p in prompts if p.strip()]
    if path:
        p = expand(path)
        if p.suffix.lower() == ".txt":
            if not p.is_file():
                raise DataError(f"prompt file not found: {p}", where=str(p), reason="missing path")
            out += [nfc(line.rstrip("\n")) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            for rec in _records(str(p), "prompt"):
                value = rec.data.get("prompt")
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{rec.where}: each line needs a non-empty 'prompt' string", where=rec.where, reason="bad prompt")
                out.append(nfc(value))
    return out
