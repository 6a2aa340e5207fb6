"""Turn records of any supported format into one canonical shape.

Everything after this module sees only ``{"text": str}`` (continued pretraining) or
``{"messages": [{"role", "content", ...}, ...], "tools"?: [...]}`` (chat/instruction tuning, in
the OpenAI shape: ``tool_calls`` on assistant turns, ``tool`` turns, ``reasoning_content``), so
templates and tokenization have a single input to handle. Read here: text, chat (OpenAI messages,
tools included), alpaca and ShareGPT (``conversations`` of ``from``/``value``); ``columns`` in a
source maps other field names onto these. Text is NFC-normalised here: the same French word in
two Unicode forms would otherwise tokenize differently.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from affinage.data.errors import DataError

FORMATS = ("text", "chat", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")

# ShareGPT ``from`` values (axolotl, LLaMA-Factory, FastChat spellings) and the role each becomes.
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "tool": "tool", "observation": "tool",
    "function_response": "tool", "function_call": "function_call",
}


def nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def detect_format(data: dict[str, Any], text_field: str = "text", messages_field: str = "messages", where: str = "?") -> str:
    """Guess the format of one record from its keys: chat, ShareGPT, alpaca, then text."""
    if messages_field in data:
        msgs = data[messages_field]
        if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "from" in msgs[0] and "role" not in msgs[0]:
            return "sharegpt"
        return "chat"
    if "conversations" in data:
        msgs = data["conversations"]
        if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "role" in msgs[0] and "from" not in msgs[0]:
            return "chat"
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if text_field in data:
        return "text"
    keys = sorted(data)[:12]
    raise DataError(
        f"{where}: cannot tell the record's format from its keys {keys}: expected {messages_field!r} (chat), "
        f"'conversations' (sharegpt), 'instruction' + 'output' (alpaca) or {text_field!r} (text). Set the source's "
        "format, and columns (or text_field/messages_field) to map your field names",
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
    columns: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Return ``{"text": ...}`` or ``{"messages": [...]}`` for one record; ``DataError`` says what is wrong."""
    if columns:
        data = map_columns(data, columns)
    if fmt == "auto":
        fmt = detect_format(data, text_field, messages_field, where)
    if fmt == "text":
        return {"text": _text(data, text_field, where)}
    if fmt == "chat":
        field = messages_field if messages_field in data or "conversations" not in data else "conversations"
        out = {"messages": _messages(data, field, where)}
    elif fmt == "sharegpt":
        field = messages_field if messages_field in data and "conversations" not in data else "conversations"
        out = {"messages": _messages(_sharegpt(data, field, where), "messages", where)}
    elif fmt == "alpaca":
        out = {"messages": _alpaca(data, where)}
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS} or 'auto'")
    if isinstance(data.get("system"), str) and data["system"].strip() and out["messages"][0]["role"] != "system":
        out["messages"].insert(0, {"role": "system", "content": nfc(data["system"])})
    tools = _tools(data.get("tools"), where)
    if tools:
        out["tools"] = tools
    return out


def map_columns(data: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename the dataset's fields to the canonical ones (``columns``: canonical -> dataset field).

    Record-level keys are renamed on the record, message-level ones (role, content, from, value)
    on each message of ``messages``/``conversations``.
    """
    out = dict(data)
    for canon, col in columns.items():
        if canon not in ("role", "content", "from", "value") and col in data:
            out[canon] = data[col]
    inner = {c: col for c, col in columns.items() if c in ("role", "content", "from", "value")}
    if inner:
        for key in ("messages", "conversations"):
            if isinstance(out.get(key), list):
                out[key] = [{**m, **{c: m[col] for c, col in inner.items() if col in m}} if isinstance(m, dict) else m for m in out[key]]
    return out


def convert(raw, spec, fmt: str | None = None, system: str = "keep") -> dict[str, Any]:
    """``to_canonical`` for a ``RawRecord`` read from ``spec`` (a ``SourceSpec``), with the ``data.system`` policy."""
    record = to_canonical(
        raw.data,
        fmt or spec.format,
        text_field=spec.text_field,
        messages_field=spec.messages_field,
        where=raw.where,
        columns=getattr(spec, "columns", None),
    )
    if system != "keep" and "messages" in record:
        from affinage.data.templates import apply_system_policy

        record["messages"] = apply_system_policy(record["messages"], system)
    return record


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
def _messages(data: dict, field: str, where: str) -> list[dict[str, Any]]:
    """OpenAI-style messages: role/content, ``tool_calls`` on assistant turns, ``tool`` turns, ``reasoning_content``."""
    if field not in data:
        raise DataError(
            f"{where}: missing field {field!r} (keys: {sorted(data)[:12]}); set the source's messages_field (or "
            "columns: {messages: <your field>}), or its format (text/alpaca/sharegpt) if this is not chat data",
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
    out: list[dict[str, Any]] = []
    for i, m in enumerate(msgs):
        loc = f"{where}: {field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{loc} is a {type(m).__name__}, expected an object with 'role' and 'content'", where=where, reason="message not an object")
        if "role" not in m and {"from", "value"} <= set(m):
            raise DataError(
                f"{loc} uses ShareGPT keys 'from'/'value'; set the source's format: sharegpt (or auto)",
                where=where,
                reason="ShareGPT keys",
            )
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{loc}: role {role!r} is not one of {ROLES} (columns: {{role: <field>}} maps another key)", where=where, reason="bad role")
        calls = _tool_calls(m.get("tool_calls"), loc, where) if role == "assistant" else None
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise DataError(
                f"{loc}: content is {'missing' if content is None else 'a ' + type(content).__name__}, expected a string",
                where=where,
                reason="content not a string",
            )
        if role == "system" and i != 0:
            raise DataError(f"{loc}: a system message is only allowed first", where=where, reason="system not first")
        reasoning = m.get("reasoning_content", m.get("thinking"))
        if reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f"{loc}: reasoning_content is a {type(reasoning).__name__}, expected a string", where=where, reason="reasoning not a string")
        if role == "assistant" and not content.strip() and not calls:
            raise DataError(f"{loc}: empty assistant reply (nothing to learn)", where=where, reason="empty assistant turn")
        msg: dict[str, Any] = {"role": role, "content": nfc(content)}
        if calls:
            msg["tool_calls"] = calls
        if role == "assistant" and reasoning and reasoning.strip():
            msg["reasoning_content"] = nfc(reasoning)
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
        out.append(msg)
    first = 1 if out[0]["role"] == "system" else 0
    if first >= len(out) or out[first]["role"] != "user":
        raise DataError(
            f"{where}: the conversation must start with a user turn (after an optional system message)",
            where=where,
            reason="does not start with user",
        )
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn, so nothing to train on", where=where, reason="no assistant turn")
    return out


def _tool_calls(calls, loc: str, where: str) -> list[dict] | None:
    """OpenAI ``tool_calls`` (``{"type": "function", "function": {"name", "arguments"}}``); arguments become a dict."""
    if calls is None or calls == []:
        return None
    if not isinstance(calls, list):
        raise DataError(f"{loc}: tool_calls is a {type(calls).__name__}, expected a list", where=where, reason="bad tool_calls")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{loc}: tool_calls[{j}] has no function name (expected {{'function': {{'name', 'arguments'}}}})", where=where, reason="bad tool_calls")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise DataError(f"{loc}: tool_calls[{j}].arguments is not valid JSON", where=where, reason="bad tool_calls") from None
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        call["id"] = str(c["id"]) if isinstance(c, dict) and c.get("id") else f"call{j:05d}"  # 9 characters, as Mistral wants
        out.append(call)
    return out


def _tools(tools, where: str) -> list[dict] | None:
    """A record's tool definitions (list, or its JSON text as LLaMA-Factory stores it), OpenAI-shaped."""
    if tools is None or tools == [] or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise DataError(f"{where}: 'tools' is a string that is not JSON", where=where, reason="bad tools") from None
    if not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' is a {type(tools).__name__}, expected a list of function definitions", where=where, reason="bad tools")
    out = []
    for j, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: tools[{j}] has no name", where=where, reason="bad tools")
        out.append({"type": "function", "function": fn})
    return out


# -------------------------------------------------------------------------------- sharegpt
def _sharegpt(data: dict, field: str, where: str) -> dict:
    """ShareGPT ``conversations`` (``from``/``value``) as OpenAI messages under ``messages``.

    ``function_call`` turns (a JSON call or list of calls in ``value``) become assistant
    ``tool_calls``; ``observation``/``tool`` turns become ``tool`` turns.
    """
    if field not in data:
        raise DataError(f"{where}: missing field {field!r} (keys: {sorted(data)[:12]}); ShareGPT records hold their turns in "
                        "'conversations' (columns: {conversations: <your field>} maps another name)", where=where,
                        reason=f"missing field {field!r}")
    turns = data[field]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{'from', 'value'}} objects", where=where, reason="messages not a non-empty list")
    msgs: list[dict[str, Any]] = []
    for i, t in enumerate(turns):
        loc = f"{where}: {field}[{i}]"
        if not isinstance(t, dict):
            raise DataError(f"{loc} is a {type(t).__name__}, expected an object with 'from' and 'value'", where=where, reason="message not an object")
        for key in ("from", "value"):
            if key not in t:
                raise DataError(f"{loc} has no {key!r} (keys: {sorted(t)}); ShareGPT turns are {{'from', 'value'}}", where=where, reason=f"missing {key!r}")
        src = str(t["from"]).lower()
        role = SHAREGPT_ROLES.get(src)
        if role is None:
            raise DataError(f"{loc}: 'from' is {t['from']!r}, not one of {sorted(SHAREGPT_ROLES)}", where=where, reason="bad role")
        value = t["value"]
        if role == "function_call":
            try:
                calls = json.loads(value) if isinstance(value, str) else value
            except json.JSONDecodeError:
                raise DataError(f"{loc}: function_call value is not JSON", where=where, reason="bad tool_calls") from None
            calls = calls if isinstance(calls, list) else [calls]
            msgs.append({"role": "assistant", "content": "", "tool_calls": [{"function": c} for c in calls]})
        else:
            msgs.append({"role": role, "content": value})
    return {"messages": msgs}


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
