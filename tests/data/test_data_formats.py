"""Formats: text/chat/alpaca to one canonical record, auto-detection, precise errors, NFC."""

from __future__ import annotations

import unicodedata

import pytest

from affinage.data.errors import DataError
from affinage.data.formats import convert, detect_format, to_canonical
from affinage.data.readers import RawRecord
from affinage.recipe.schema import SourceSpec

CHAT = {"messages": [{"role": "user", "content": "Où ?"}, {"role": "assistant", "content": "À Paris."}]}


def test_alpaca_with_and_without_input():
    rec = {"instruction": "Traduis en anglais.", "input": "Le château est à côté de l'église.", "output": "The castle is next to the church."}
    assert to_canonical(rec, "alpaca") == {
        "messages": [
            {"role": "user", "content": "Traduis en anglais.\n\nLe château est à côté de l'église."},
            {"role": "assistant", "content": "The castle is next to the church."},
        ]
    }
    for empty in ({"input": ""}, {"input": "  "}, {}, {"input": None}):
        rec = {"instruction": "Cite une ville.", "output": "Lyon.", **empty}
        assert to_canonical(rec, "alpaca")["messages"][0]["content"] == "Cite une ville."


def test_auto_detection():
    assert detect_format(CHAT) == "chat"
    assert detect_format({"instruction": "a", "output": "b", "text": "c"}) == "alpaca"
    assert detect_format({"text": "Bonjour."}) == "text"
    assert detect_format({"body": "Bonjour."}, text_field="body") == "text"
    assert detect_format({"conv": []}, messages_field="conv") == "chat"
    with pytest.raises(DataError, match=r"f.jsonl:7: cannot tell the record's format from its keys \['foo'\]"):
        detect_format({"foo": 1}, where="f.jsonl:7")
    assert to_canonical({"text": "Bonjour."}, "auto") == {"text": "Bonjour."}


def test_convert_uses_spec_fields_and_location():
    spec = SourceSpec(path="x.jsonl", format="text", text_field="article")
    raw = RawRecord({"article": "Art. 1"}, "x.jsonl", line=4)
    assert convert(raw, spec) == {"text": "Art. 1"}
    with pytest.raises(DataError, match=r"x.jsonl:4: missing field 'article'.*text_field"):
        convert(RawRecord({"text": "Art. 1"}, "x.jsonl", line=4), spec)


def test_nfc_normalisation():
    decomposed = "e\u0301te\u0301 a\u0300 l'ho\u0302pital"  # été à l'hôpital, combining accents
    assert unicodedata.normalize("NFC", decomposed) != decomposed
    out = to_canonical({"text": decomposed}, "text")["text"]
    assert out == "été à l'hôpital" and unicodedata.is_normalized("NFC", out)
    msgs = to_canonical({"messages": [{"role": "user", "content": decomposed}, {"role": "assistant", "content": decomposed}]}, "chat")
    assert all(m["content"] == "été à l'hôpital" for m in msgs["messages"])


@pytest.mark.parametrize(
    "record, pattern",
    [
        ({"messages": []}, r"'messages' is an empty list"),
        ({"messages": "bonjour"}, r"'messages' is a str"),
        ({"messages": [{"role": "user", "content": "a"}]}, r"no assistant turn"),
        ({"messages": [{"role": "human", "content": "a"}]}, r"messages\[0\]: role 'human' is not one of"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}, r"messages\[0\]: content is a int"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}, r"messages\[1\]: content is missing"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}, r"empty assistant reply"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, r"must start with a user turn"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]},
            r"messages\[1\]: a system message is only allowed first",
        ),
        ({"messages": [{"from": "human", "value": "a"}]}, r"ShareGPT keys 'from'/'value'"),
        ({"messages": ["a"]}, r"messages\[0\] is a str"),
        ({"text": "x"}, r"missing field 'messages'"),
    ],
)
def test_bad_chat_records(record, pattern):
    with pytest.raises(DataError, match=r"^d.jsonl:9: .*" + pattern) as e:
        to_canonical(record, "chat", where="d.jsonl:9")
    assert e.value.where == "d.jsonl:9"


@pytest.mark.parametrize(
    "record, pattern",
    [
        ({"output": "b"}, r"alpaca record without 'instruction'"),
        ({"instruction": "a"}, r"alpaca record without 'output'"),
        ({"instruction": "a", "output": ""}, r"alpaca field 'output' must be a non-empty string"),
        ({"instruction": "a", "output": "b", "input": 4}, r"alpaca field 'input' is a int"),
    ],
)
def test_bad_alpaca_records(record, pattern):
    with pytest.raises(DataError, match=r"^a.json \(row 2\): " + pattern):
        to_canonical(record, "alpaca", where="a.json (row 2)")


def test_bad_text_records():
    with pytest.raises(DataError, match=r"field 'text' is empty"):
        to_canonical({"text": "  "}, "text", where="t")
    with pytest.raises(DataError, match=r"field 'text' is a list"):
        to_canonical({"text": ["a"]}, "text", where="t")
