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
        ({"messages": [{"role": "user", "from": "human", "value": "a"}, {"role": "assistant", "content": "b"}]}, r"messages\[0\]: content is missing"),
        ({"messages": [{"from": "human", "value": "a"}]}, r"ShareGPT keys 'from'/'value'; set the source's format: sharegpt"),
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


# ------------------------------------------------------------------ ShareGPT, tools, reasoning, columns
SHAREGPT = {
    "system": "Réponds en français.",
    "conversations": [
        {"from": "human", "value": "Où siège le Sénat ?"},
        {"from": "gpt", "value": "Au palais du Luxembourg, à Paris."},
        {"from": "user", "value": "Et l'Assemblée ?"},
        {"from": "bot", "value": "Au palais Bourbon."},
    ],
}


def test_sharegpt_roles_aliases_and_system_field():
    out = to_canonical(SHAREGPT, "auto")
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert out["messages"][0]["content"] == "Réponds en français."
    assert out["messages"][4]["content"] == "Au palais Bourbon."
    assert detect_format(SHAREGPT) == "sharegpt"
    # ShareGPT turns under 'messages' are detected too, and role/content turns under 'conversations' are chat
    assert detect_format({"messages": SHAREGPT["conversations"]}) == "sharegpt"
    openai_style = {"conversations": [{"role": "user", "content": "Où ?"}, {"role": "assistant", "content": "Ici."}]}
    assert detect_format(openai_style) == "chat"
    assert to_canonical(openai_style, "auto")["messages"][1] == {"role": "assistant", "content": "Ici."}


def test_sharegpt_function_call_and_observation_become_openai_tool_turns():
    rec = {
        "conversations": [
            {"from": "human", "value": "Quel temps à Lyon ?"},
            {"from": "function_call", "value": '{"name": "meteo", "arguments": {"ville": "Lyon"}}'},
            {"from": "observation", "value": "12 °C, pluie"},
            {"from": "gpt", "value": "Il pleut, 12 °C."},
        ],
        "tools": '[{"name": "meteo", "description": "la météo", "parameters": {"type": "object"}}]',
    }
    out = to_canonical(rec, "sharegpt", where="s.jsonl:3")
    call = out["messages"][1]
    assert call["role"] == "assistant" and call["content"] == ""
    assert call["tool_calls"][0]["function"] == {"name": "meteo", "arguments": {"ville": "Lyon"}}
    assert len(call["tool_calls"][0]["id"]) == 9
    assert out["messages"][2] == {"role": "tool", "content": "12 °C, pluie"}
    assert out["tools"] == [{"type": "function", "function": {"name": "meteo", "description": "la météo", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    "record, pattern",
    [
        ({"conversations": [{"from": "human"}]}, r"conversations\[0\] has no 'value'"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, r"conversations\[0\]: 'from' is 'alien'"),
        ({"conversations": []}, r"'conversations' must be a non-empty list"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{oops"}]}, r"function_call value is not JSON"),
    ],
)
def test_bad_sharegpt_records_name_the_record(record, pattern):
    with pytest.raises(DataError, match=r"^s.jsonl:4: .*" + pattern):
        to_canonical(record, "sharegpt", where="s.jsonl:4")


def test_openai_tools_tool_calls_and_reasoning_pass_through():
    rec = {
        "tools": [{"type": "function", "function": {"name": "meteo", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "user", "content": "Quel temps à Lyon ?"},
            {"role": "assistant", "content": None, "reasoning_content": "Il faut la météo.",
             "tool_calls": [{"id": "abc123def", "type": "function", "function": {"name": "meteo", "arguments": '{"ville": "Lyon"}'}}]},
            {"role": "tool", "tool_call_id": "abc123def", "content": "12 °C"},
            {"role": "assistant", "content": "Il fait 12 °C."},
        ],
    }
    out = to_canonical(rec, "auto")
    m = out["messages"][1]
    assert m["content"] == "" and m["reasoning_content"] == "Il faut la météo."
    assert m["tool_calls"] == [{"type": "function", "function": {"name": "meteo", "arguments": {"ville": "Lyon"}}, "id": "abc123def"}]
    assert out["messages"][2] == {"role": "tool", "content": "12 °C", "tool_call_id": "abc123def"}
    assert out["tools"][0]["function"]["name"] == "meteo"
    with pytest.raises(DataError, match=r"r:1: messages\[1\]: tool_calls\[0\] has no function name"):
        to_canonical({"messages": [rec["messages"][0], {"role": "assistant", "tool_calls": [{"x": 1}]}]}, "chat", where="r:1")


def test_columns_map_other_field_names():
    spec = SourceSpec(path="x.jsonl", format="auto", columns={"conversations": "dialogue", "from": "speaker", "value": "text"})
    raw = RawRecord({"dialogue": [{"speaker": "human", "text": "Bonjour ?"}, {"speaker": "gpt", "text": "Bonjour !"}]}, "x.jsonl", line=2)
    assert convert(raw, spec) == {"messages": [{"role": "user", "content": "Bonjour ?"}, {"role": "assistant", "content": "Bonjour !"}]}
    alp = SourceSpec(path="a.jsonl", format="alpaca", columns={"instruction": "prompt", "output": "response"})
    assert convert(RawRecord({"prompt": "Cite Rennes.", "response": "Rennes."}, "a.jsonl", line=1), alp)["messages"][1]["content"] == "Rennes."
    with pytest.raises(Exception, match=r"columns maps unknown field\(s\) \['bogus'\]"):
        SourceSpec(path="x.jsonl", columns={"bogus": "y"})


def test_system_policy_in_convert():
    spec = SourceSpec(path="x.jsonl", format="sharegpt")
    raw = RawRecord(SHAREGPT, "x.jsonl", line=1)
    merged = convert(raw, spec, system="merge_into_first_user")["messages"]
    assert merged[0] == {"role": "user", "content": "Réponds en français.\n\nOù siège le Sénat ?"}
    assert convert(raw, spec, system="drop")["messages"][0] == {"role": "user", "content": "Où siège le Sénat ?"}
