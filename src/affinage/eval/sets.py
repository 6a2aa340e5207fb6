"""Read evaluation sets: held-out texts, multiple-choice items, prompts.

The files are read with the same readers as training data (``.jsonl``/``.json``/``.parquet``, a
folder of ``.txt`` files), so a malformed line is reported as ``file:line`` with what to fix.
Multiple-choice items are JSON objects ``{"question": str, "choices": [str, ...], "answer": 0}``, the
layout of lm-eval's multiple-choice tasks; the answer may also be a letter (``"B"``) or the right
choice's text, and the field names can be mapped (``answer_index``, ``options``…). A set may name a
grouping field (the book a passage comes from): its values travel with the items to the bootstrap.
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


def _group(rec, group_field: Optional[str]) -> Optional[str]:
    if group_field is None:
        return None
    value = rec.data.get(group_field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(
            f"{rec.where}: no group field {group_field!r} (keys: {', '.join(sorted(rec.data)) or 'none'}); every record "
            "of a grouped set names its group — fix the record or the set's group_field",
            where=rec.where, reason="no group field",
        )
    return str(value)


# ---------------------------------------------------------------------------------- texts
@dataclass(frozen=True)
class TextSet:
    texts: list[str]
    groups: Optional[list[str]]  # one label per text when the set names a group_field


def read_text_set(path: str, text_field: str = "text", max_records: Optional[int] = None,
                  group_field: Optional[str] = None) -> TextSet:
    """The texts of a held-out file (NFC), in file order, with their groups; empty texts are skipped."""
    texts: list[str] = []
    groups: list[str] = []
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
            groups.append(_group(rec, group_field))
        if max_records and len(texts) >= max_records:
            break
    if not texts:
        raise DataError(f"evaluation file {path} holds no text", where=str(path), reason="empty")
    return TextSet(texts, groups if group_field else None)


def read_texts(path: str, text_field: str = "text", max_records: Optional[int] = None) -> list[str]:
    """The texts of a held-out file (NFC), in file order; empty texts are skipped."""
    return read_text_set(path, text_field, max_records).texts


# -------------------------------------------------------------------------------- MCQ items
@dataclass(frozen=True)
class McqItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    where: str
    group: Optional[str] = None


def _answer_index(answer, choices: list[str]) -> Optional[int]:
    """The right choice's index from an index, a letter (A = 0) or the choice's own text; None if none fits."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    if isinstance(answer, str):
        text = answer.strip()
        if text.isdigit() and int(text) < len(choices):
            return int(text)
        if len(text) == 1 and text.isalpha() and ord(text.upper()) - 65 < len(choices):
            return ord(text.upper()) - 65
        stripped = [c.strip() for c in choices]
        if text in stripped:
            return stripped.index(text)
    return None


def read_mcq(path: str, max_items: Optional[int] = None, *, question_field: str = "question",
             choices_field: str = "choices", answer_field: str = "answer",
             group_field: Optional[str] = None) -> list[McqItem]:
    """Multiple-choice items; each bad item is an error naming its line, the field and the fix."""
    items: list[McqItem] = []
    layout = f'{{"{question_field}": "...", "{choices_field}": ["...", "..."], "{answer_field}": 0}}'
    for rec in _records(path):
        d = rec.data
        q, choices, answer = d.get(question_field), d.get(choices_field), d.get(answer_field)
        problem = None
        index = None
        if not isinstance(q, str) or not q.strip():
            problem = f"{question_field!r} must be a non-empty string"
        elif not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            problem = f"{choices_field!r} must be a list of at least two non-empty strings"
        else:
            index = _answer_index(answer, choices)
            if index is None:
                problem = (f"{answer_field!r} must be the index (0 to {len(choices) - 1}), the letter "
                           f"(A to {chr(64 + len(choices))}) or the text of the right choice, got {answer!r}")
        if problem:
            keys = ", ".join(sorted(d)) or "none"
            raise DataError(
                f"{rec.where}: {problem} (keys here: {keys}). Items look like {layout}; map other field names with "
                "question_field / choices_field / answer_field",
                where=rec.where, reason="bad MCQ item",
            )
        items.append(McqItem(nfc(q.strip()), tuple(nfc(c.strip()) for c in choices), int(index), rec.where,
                             _group(rec, group_field)))
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
