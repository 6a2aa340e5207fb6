"""Turn records of any supported format into one canonical shape.

Everything after this module sees only ``{"text": str}`` (continued pretraining) or
``{"messages": [{"role", "content"}, ...]}`` (chat/instruction tuning), so templates and
tokenization have a single input to handle. Text is NFC-normalised here: the same French word in
two Unicode forms would otherwise tokenize differently.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from affinage.data.errors import DataError

FORMATS = ("text", "chat", "alpaca")
ROLES = ("system", "user", "assistant")


def nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def detect_format(data: dict[str, Any], text_field: str = "text", messages_field: str = "messages", where: str = "?") -> str:
    """Guess the format of one record from its keys: chat, then alpaca, then text."""
    if messages_field in data:
        return "chat"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if text_field in data:
        return "text"
    keys = sorted(data)[:12]
    raise DataError(
        f"{where}: cannot tell the record's format from its keys {keys}: expected {messages_field!r} (chat), "
        f"'instruction' + 'output' (alpaca) or {text_field!r} (text). Set the source's format and "
        "text_field/messages_field to match your data",
        where=where,
        reason="unknown format",
    )


def to_canonical(
    data: dict[str, Any],
    fmt: str,
    *,
    text_field: str = "text",
    messages_field: str = "messages",
    where: str = "?",
) -> dict[str, Any]:
    """Return ``{"text": ...}`` or ``{"messages": [...]}`` for one record; ``DataError`` says what is wrong."""
    if fmt == "auto":
        fmt = detect_format(data, text_field, messages_field, where)
    if fmt == "text":
        return {"text": _text(data, text_field, where)}
    if fmt == "chat":
        return {"messages": _messages(data, messages_field, where)}
    if fmt == "alpaca":
        return {"messages": _alpaca(data, where)}
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS} or 'auto'")


def convert(raw, spec, fmt: str | None = None) -> dict[str, Any]:
    """``to_canonical`` for a ``RawRecord`` read from ``spec`` (a ``SourceSpec``)."""
    return to_canonical(
        raw.data,
        fmt or spec.format,
        text_field=spec.text_field,
        messages_field=spec.messages_field,
        where=raw.where,
    )


def canonical_kind(record: dict[str, Any]) -> str:
    """``"text"`` or ``"chat"``: which of the two canonical shapes ``record`` has."""
    return "chat" if "messages" in record else "text"


# ------------------------------------------------------------------------------------ text
def _text(data: dict, field: str, where: str) -> str:
    if field not in data:
        raise DataError(
            f"{where}: missing field {field!r} (keys: {sorted(data)[:12]}); set the source's text_field to the "
            "field that holds the text",
            where=where,
            reason=f"missing field {field!r}",
        )
    value = data[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, expected a string", where=where, reason=f"{field!r} not a string")
    if not value.strip():
        raise DataError(f"{where}: field {field!r} is empty", where=where, reason="empty text")
    return nfc(value)


# ------------------------------------------------------------------------------------ chat
def _messages(data: dict, field: str, where: str) -> list[dict[str, str]]:
    if field not in data:
        raise DataError(
            f"{where}: missing field {field!r} (keys: {sorted(data)[:12]}); set the source's messages_field, or "
            "its format (text/alpaca) if this is not chat data",
            where=where,
            reason=f"missing field {field!r}",
        )
    msgs = data[field]
    if not isinstance(msgs, list) or not msgs:
        what = "an empty list" if isinstance(msgs, list) else f"a {type(msgs).__name__}"
        raise DataError(
            f"{where}: {field!r} is {what}; expected a non-empty list of {{'role', 'content'}} objects",
            where=where,
            reason="messages not a non-empty list",
        )
    out: list[dict[str, str]] = []
    for i, m in enumerate(msgs):
        loc = f"{where}: {field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{loc} is a {type(m).__name__}, expected an object with 'role' and 'content'", where=where, reason="message not an object")
        if "role" not in m and {"from", "value"} <= set(m):
            raise DataError(
                f"{loc} uses ShareGPT keys 'from'/'value'; convert to 'role' (system/user/assistant) and 'content'",
                where=where,
                reason="ShareGPT keys",
            )
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{loc}: role {role!r} is not one of {ROLES}", where=where, reason="bad role")
        if not isinstance(content, str):
            raise DataError(
                f"{loc}: content is {'missing' if content is None else 'a ' + type(content).__name__}, expected a string",
                where=where,
                reason="content not a string",
            )
        if role == "system" and i != 0:
            raise DataError(f"{loc}: a system message is only allowed first", where=where, reason="system not first")
        if role == "assistant" and not content.strip():
            raise DataError(f"{loc}: empty assistant reply (nothing to learn)", where=where, reason="empty assistant turn")
        out.append({"role": role, "content": nfc(content)})
    first = 1 if out[0]["role"] == "system" else 0
    if first >= len(out) or out[first]["role"] != "user":
        raise DataError(
            f"{where}: the conversation must start with a user turn (after an optional system message)",
            where=where,
            reason="does not start with user",
        )
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn, so nothing to train on", where=where, reason="no assistant turn")
    if out[-1]["role"] != "assistant":  # its trailing turn would be dropped without a word
        raise DataError(f"{where}: the conversation ends on a {out[-1]['role']} turn with no reply to learn from; end it "
                        "with the assistant's reply or remove that turn (data.on_bad_record: skip counts and skips such "
                        "records)", where=where, reason="ends without an assistant reply")
    return out


# ---------------------------------------------------------------------------------- alpaca
def _alpaca(data: dict, where: str) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if key not in data:
            raise DataError(f"{where}: alpaca record without {key!r} (keys: {sorted(data)[:12]})", where=where, reason=f"missing field {key!r}")
        if not isinstance(data[key], str) or not data[key].strip():
            raise DataError(f"{where}: alpaca field {key!r} must be a non-empty string", where=where, reason=f"empty {key!r}")
    extra = data.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{where}: alpaca field 'input' is a {type(extra).__name__}, expected a string", where=where, reason="'input' not a string")
    user = data["instruction"]
    if extra and extra.strip():
        user = user + "\n\n" + extra
    return [{"role": "user", "content": nfc(user)}, {"role": "assistant", "content": nfc(data["output"])}]
