"""Evaluation sets a user brings: MCQ field names and answer forms, grouping fields, clear errors."""

from __future__ import annotations

import json

import pytest

from affinage.data.errors import DataError
from affinage.eval.sets import read_mcq, read_text_set


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_mcq_answer_as_index_letter_or_text_with_mapped_fields(tmp_path):
    rows = [
        {"q": "Capitale de la France ?", "options": ["Lyon", "Paris", "Nice"], "answer_index": 1, "book": "geo"},
        {"q": "Auteur des Misérables ?", "options": ["Hugo", "Zola"], "answer_index": "A", "book": "lit"},
        {"q": "Fleuve de Paris ?", "options": ["Loire", "Seine"], "answer_index": "Seine", "book": "geo"},
        {"q": "Année de la Révolution ?", "options": ["1789", "1815"], "answer_index": "0", "book": "hist"},
    ]
    items = read_mcq(_jsonl(tmp_path / "q.jsonl", rows), question_field="q", choices_field="options",
                     answer_field="answer_index", group_field="book")
    assert [it.answer for it in items] == [1, 0, 1, 0]
    assert [it.group for it in items] == ["geo", "lit", "geo", "hist"]


def test_mcq_bad_answer_names_the_line_the_field_and_the_mapping(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "?", "choices": ["a", "b"], "answer_index": 1}])
    with pytest.raises(DataError) as e:
        read_mcq(path)
    text = str(e.value)
    assert "q.jsonl:1" in text and "'answer'" in text and "answer_index" in text and "answer_field" in text


def test_grouped_text_set_and_a_missing_group_is_an_error(tmp_path):
    rows = [{"text": f"Passage {i}.", "book": f"livre-{i % 3}"} for i in range(6)]
    ts = read_text_set(_jsonl(tmp_path / "t.jsonl", rows), group_field="book")
    assert ts.groups == ["livre-0", "livre-1", "livre-2"] * 2 and len(ts.texts) == 6
    assert read_text_set(str(tmp_path / "t.jsonl")).groups is None
    bad = _jsonl(tmp_path / "bad.jsonl", rows[:2] + [{"text": "Sans livre."}])
    with pytest.raises(DataError, match=r"bad.jsonl:3: no group field 'book'"):
        read_text_set(bad, group_field="book")
