"""Chat templates and the SFT loss mask: which tokens the model is trained to produce.

Real templates have no ``{% generation %}`` markers, and many render a turn differently depending
on what follows (EOS only after the last message, thinking dropped from earlier turns, trimmed
whitespace, injected dates and system prompts). So spans are not found from exact prefixes: each
assistant reply is located by rendering the conversation once more with that message replaced by a
sentinel (the reply is where the two renderings differ), then widened to the end of its
generation prompt and to the end-of-turn marker that follows it (``render_chat`` states the rule).
For a batch, the extra renderings come from per-role-sequence skeletons (``TemplateSkeletons``)
whenever the template writes the contents verbatim, so each conversation is rendered once.
Tokens are then masked from character offsets (fast tokenizers only); a special token carries loss
only when the span holds all of it, so a role header never does.

One cohesive thing (over 400 lines): rendering a conversation and finding which of its tokens
carry loss, one algorithm; the named fallback templates sit at its top.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from affinage.data.errors import DataError

# Standard public formats, for base models that ship without a template. Each renders the
# generation prompt exactly as the start of the assistant turn, so prefixes line up.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# [INST] format; unlike Mistral v0.3's own template, the system message goes into the FIRST user
# turn, so it is rendered the same way whether or not the conversation ends with an assistant turn.
MISTRAL = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] | trim + (eos_token or '') }}{%- endif %}"
    "{%- endfor %}"
)

NAMED_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}

# Marker strings each named template relies on; a base model should have them as single tokens.
TEMPLATE_MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("[INST]", "[/INST]"),
}


@dataclass
class TokenizedSample:
    """One training sequence; ``loss_mask[i]`` is True where token i carries loss."""

    input_ids: list[int]
    loss_mask: list[bool]
    truncated: bool = False

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------- template choice
def resolve_chat_template(tokenizer, name_or_path: Optional[str] = None, model_name: Optional[str] = None) -> str:
    """Set and return ``tokenizer.chat_template`` from a named template or a ``.jinja`` file.

    With no name, keep the tokenizer's own template, or fail early (before any training) when
    there is none: a base model needs ``model.chat_template`` in the recipe for chat data.
    """
    if name_or_path:
        if name_or_path in NAMED_TEMPLATES:
            template = NAMED_TEMPLATES[name_or_path]
            missing = missing_markers(tokenizer, name_or_path)
            if missing:
                warnings.warn(
                    f"chat template {name_or_path!r}: {missing} are not single tokens of this tokenizer; the model will "
                    "learn them as several tokens. Add them as special tokens (and resize the embeddings), or pick the "
                    "template the model family uses",
                    stacklevel=2,
                )
        else:
            path = Path(name_or_path).expanduser()
            if not path.is_file():
                raise DataError(
                    f"chat template {name_or_path!r} is neither a named template ({', '.join(NAMED_TEMPLATES)}) nor an "
                    f"existing .jinja file (looked for {path.resolve()})"
                )
            template = path.read_text(encoding="utf-8")
        tokenizer.chat_template = template
        return template
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    name = model_name or getattr(tokenizer, "name_or_path", None) or "this model"
    raise DataError(
        f"model {name} has no chat template; set model.chat_template: chatml (or llama3, mistral, or a .jinja file)"
    )


def missing_markers(tokenizer, name: str) -> list[str]:
    """The named template's marker strings that the tokenizer does not hold as one token."""
    vocab = tokenizer.get_vocab()
    return [m for m in TEMPLATE_MARKERS.get(name, ()) if m not in vocab]


def _template_label(tokenizer, chat_template: Optional[str]) -> str:
    """How error messages name the template: its name if it is a named one, else whose it is."""
    text = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    for name, named in NAMED_TEMPLATES.items():
        if text == named:
            return f"chat template {name!r}"
    if chat_template is None:
        return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"
    return "the given chat template"


# ------------------------------------------------------------------------------- rendering
# Marks one message's place in a rendering (private-use characters: no template trims, escapes or
# splits on them, and no real text contains them).
SENTINEL = "\ue000affinage\ue001"

# End-of-turn markers of the families we know; with the tokenizer's EOS, the only text after a
# reply that carries loss. A chain of them (Command-A: <|END_RESPONSE|><|END_OF_TURN_TOKEN|>) counts.
END_MARKERS: tuple[str, ...] = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|eot|>", "<|eom|>", "</s>", "<end_of_turn>", "<|end|>",
    "<|END_RESPONSE|>", "<|END_OF_TURN_TOKEN|>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|return|>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "<|end\u2581of\u2581sentence|>", "[|endofturn|]", "<|assistant_end|>",
)

SYSTEM_POLICIES = ("keep", "merge_into_first_user", "drop")


def apply_system_policy(messages: Sequence[dict], policy: str = "keep") -> list[dict]:
    """``data.system``: keep the system message, fold it into the first user turn, or drop it.

    For templates that refuse a system role (Gemma 2, Mistral v0.1 raise) or drop it silently.
    """
    if policy not in SYSTEM_POLICIES:
        raise DataError(f"data.system must be one of {', '.join(SYSTEM_POLICIES)} (got {policy!r})")
    msgs = [dict(m) for m in messages]
    if policy == "keep" or not msgs or msgs[0].get("role") != "system":
        return msgs
    system, rest = msgs[0], msgs[1:]
    if policy == "merge_into_first_user" and system.get("content"):
        for m in rest:
            if m.get("role") == "user":
                m["content"] = system["content"] + "\n\n" + (m.get("content") or "")
                break
    return rest


def _render(tokenizer, messages: Sequence[dict], generation_prompt: bool, chat_template: Optional[str], tools, label: str, turn: int) -> str:
    kwargs = {"tools": tools} if tools else {}
    try:
        out = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt, chat_template=chat_template, **kwargs
        )
    except DataError:
        raise
    except Exception as e:  # jinja2 TemplateError, raise_exception(), missing template ...
        hint = ""
        if messages and messages[0].get("role") == "system" and ("system" in str(e).lower() or "alternate" in str(e).lower()):
            hint = (" The template refuses a system message: set data.system: merge_into_first_user (or drop) in the "
                    "recipe, or use a template that renders one")
        raise DataError(f"{label} failed to render the conversation up to messages[{turn}]: {e}.{hint}") from None
    if not isinstance(out, str):
        raise DataError(f"{label}: apply_chat_template(tokenize=False) returned {type(out).__name__}, expected str")
    return out


def _common_run(a: str, b: str, limit: int, from_end: bool) -> int:
    """Length (≤ ``limit``) of the longest common prefix, or suffix, of ``a`` and ``b``: bisection on slice
    equality (compared in C, not per character)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (a[len(a) - mid :] == b[len(b) - mid :]) if from_end else (a[:mid] == b[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _diff_region(real: str, marked: str) -> tuple[int, int, int]:
    """(start, end in ``real``, end in ``marked``) of the part where two renderings differ."""
    n = min(len(real), len(marked))
    p = _common_run(real, marked, n, from_end=False)
    q = _common_run(real, marked, n - p, from_end=True)
    return p, len(real) - q, len(marked) - q


def special_tokens(tokenizer) -> set[str]:
    """Text of the tokenizer's special tokens (role headers, BOS/EOS, ...); never loss-bearing unless an end marker."""
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            out.add(str(tok))
    return out


def end_markers(tokenizer) -> tuple[str, ...]:
    """End-of-turn markers for this tokenizer: the known ones and its EOS, longest first."""
    marks = set(END_MARKERS)
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        marks.add(str(eos))
    return tuple(sorted(marks, key=len, reverse=True))


def header_tokens(tokenizer, chat_template: Optional[str], marks: Sequence[str]) -> set[str]:
    """Special tokens of the template's role headers: those it writes around a user message and in its
    generation prompt (``<|im_start|>``, ``[INST]``, ``<start_of_turn>``...), end-of-turn markers aside.
    They never carry loss; other special tokens (``[TOOL_CALLS]``) may, inside a reply."""
    specials = special_tokens(tokenizer)
    try:
        probe = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                              add_generation_prompt=True, chat_template=chat_template)
    except Exception:
        return specials - set(marks)
    return {t for t in specials if t in probe and t not in marks}


def _marked(message: dict) -> dict:
    """``message`` with its content (and tool call names and arguments) replaced by the sentinel."""
    out = {"role": "assistant", "content": SENTINEL}
    calls = message.get("tool_calls")
    if calls:
        out["content"] = SENTINEL if (message.get("content") or "").strip() else message.get("content")
        marked_calls = []
        for n, call in enumerate(calls):
            c = dict(call)
            fn = dict(c.get("function", {}))
            fn["name"] = f"{SENTINEL}{n}"
            fn["arguments"] = "{}" if isinstance(fn.get("arguments"), str) else {}
            c["function"] = fn
            marked_calls.append(c)
        out["tool_calls"] = marked_calls
    return out


def _visible(content: str) -> str:
    """The part of a reply every template renders: without an inline ``<think>...</think>`` block."""
    return content.split("</think>")[-1].strip() if "</think>" in content else content.strip()


def _tool_names(message: dict) -> list[str]:
    names = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        if isinstance(fn, dict) and fn.get("name"):
            names.append(str(fn["name"]))
    return names


# Message i's content in a skeleton rendering (private-use characters, as for SENTINEL).
_SLOT = "\ue002{}\ue003"
_SLOT_SPLIT = re.compile("\ue002([0-9]+)\ue003")


class TemplateSkeletons:
    """A template's renderings with each message's content replaced by a placeholder, one per role sequence.

    ``render_chat`` renders a conversation several times (the whole text, the text with one reply
    replaced by the sentinel, each turn's generation prompt). For a template that writes each
    content verbatim, each of those is the skeleton of its role sequence with the contents put
    back, a string join. ``render_chat`` renders the conversation once and uses the skeletons only
    when the filled skeleton equals that rendering; a template that trims, rewrites or tests a
    content (Qwen3's ``</think>`` split, ``| trim`` on padded text) fails that check and is rendered
    each time as before. Plain ``role``/``content`` messages only, no tools.
    """

    def __init__(self, tokenizer, chat_template: Optional[str] = None):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self._parts: dict = {}

    def fill(self, messages: Sequence[dict], generation_prompt: bool) -> Optional[str]:
        """The rendering of ``messages`` from its skeleton, or None where there is none to use."""
        roles, contents = [], []
        for m in messages:
            content = m.get("content")
            if len(m) != 2 or not isinstance(content, str) or not isinstance(m.get("role"), str):
                return None
            roles.append(m["role"])
            contents.append(content)
        key = (tuple(roles), generation_prompt)
        if key not in self._parts:
            self._parts[key] = self._skeleton(key[0], generation_prompt)
        parts = self._parts[key]
        if parts is None:
            return None
        literals, slots = parts
        out = [literals[0]]
        for j, i in enumerate(slots):
            out.append(contents[i])
            out.append(literals[j + 1])
        return "".join(out)

    def _skeleton(self, roles: tuple, generation_prompt: bool):
        msgs = [{"role": r, "content": _SLOT.format(i)} for i, r in enumerate(roles)]
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt,
                                                      chat_template=self.chat_template)
        except Exception:  # the real rendering raises its own error, with the record's turn
            return None
        if not isinstance(text, str):
            return None
        pieces = _SLOT_SPLIT.split(text)
        slots = [int(x) for x in pieces[1::2]]
        if any(i >= len(roles) for i in slots):
            return None
        return pieces[0::2], slots


@dataclass
class ChatRendering:
    """A conversation as trained on: ``text`` and, per assistant turn, the character span with loss."""

    text: str
    spans: list[tuple[int, int]]
    turns: list[int]  # message index of each span


def render_chat(tokenizer, messages: Sequence[dict], chat_template: Optional[str] = None, tools=None,
                headers: Optional[set[str]] = None, skeletons: Optional["TemplateSkeletons"] = None) -> ChatRendering:
    """Render ``messages`` and find the loss-bearing span of each assistant turn.

    ``headers``: ``header_tokens`` of this tokenizer and template when the caller already has them
    (a batch of conversations computes them once instead of once per conversation). ``skeletons``:
    a ``TemplateSkeletons`` of this tokenizer and template, to render the conversation once and
    take the other renderings below from it (same result; see that class).

    The span of assistant turn k is, in the rendered text ``T``:

    * start: the end of the generation prompt ``P_k`` (``messages[:k]`` rendered with
      ``add_generation_prompt=True``) when ``T`` begins with ``P_k`` and nothing between it and the
      reply is a special token (so Qwen3's ``</think>`` after its ``<think>`` prompt, or Mistral's
      space after ``[/INST]``, are learnt as the model produces them); otherwise the reply itself;
    * the reply: what the template renders from this message, found by rendering the conversation
      again with this one message's content replaced by a sentinel and taking the part where the
      two renderings differ (content as the template trims it, reasoning, tool calls);
    * end: the end-of-turn markers right after the reply (``<|im_end|>``, ``<|eot_id|>``, ``</s>``,
      ``<end_of_turn>``, ``<|end|>``, the EOS...), with the whitespace before them; none if the
      template puts none there (some add EOS only after the last message). A final turn the
      template leaves unterminated (Apertus writes ``<|assistant_end|>`` only before a next
      message) gets the marker it writes once the conversation goes on.

    Role headers and generation prompts never carry loss. ``T`` is the template's rendering up to
    the last assistant turn; if that rendering does not begin with the last turn's prompt (Mistral
    v0.3 renders the system message only in a final user turn) the text is that prompt followed by
    the last turn, i.e. what the model sees at inference. Anything that cannot be aligned is a
    ``DataError`` naming the turn, never a guess.
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        resolve_chat_template(tokenizer, None)  # raises the "no chat template" DataError
    label = _template_label(tokenizer, chat_template)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        raise DataError("the conversation has no assistant turn, so nothing to train on")
    if turns[0] == 0:
        raise DataError(f"{label}: messages[0] is an assistant turn; a conversation must start with a user turn")
    msgs = [dict(m) for m in messages[: turns[-1] + 1]]
    last = turns[-1]

    def real_render(ms, gen, turn):
        return _render(tokenizer, ms, gen, chat_template, tools, label, turn)

    render = real_render
    try:
        full = real_render(msgs, False, last)
    except DataError:
        for j in range(1, last + 1):  # name the first message the template refuses
            real_render(msgs[:j], False, j - 1)
        raise
    if (skeletons is not None and not tools and skeletons.tokenizer is tokenizer and skeletons.chat_template == chat_template
            and skeletons.fill(msgs, False) == full):
        def render(ms, gen, turn):  # noqa: F811 - the template writes these contents verbatim: fill its skeletons
            text = skeletons.fill(ms, gen)
            return text if text is not None else real_render(ms, gen, turn)
    prompt_last = render(msgs[:last], True, last - 1)
    stitched = not full.startswith(prompt_last)
    marks = end_markers(tokenizer)
    if headers is None:
        headers = header_tokens(tokenizer, chat_template, marks)

    def reply_region(base_msgs, gen, k, text):
        marked_msgs = list(base_msgs)
        marked_msgs[k] = _marked(base_msgs[k])
        marked = render(marked_msgs, gen, k)
        a, b, mb = _diff_region(text, marked)
        if SENTINEL not in marked[a:mb]:
            why = ("the template does not render this message's content" if SENTINEL not in marked else
                   "replacing its content changes the rendering elsewhere too")
            if _tool_names(base_msgs[k]):
                why = "the template does not render this turn's tool calls (use a template with tool support)"
            raise DataError(
                f"{label}: cannot find assistant turn {turns.index(k)} (messages[{k}]) in the rendering: {why}. Use a "
                "template that renders each assistant message as it is (e.g. model.chat_template: chatml)"
            )
        return a, b

    spans: list[tuple[int, int]] = []
    if stitched:
        regions = {k: reply_region(msgs[:last], True, k, prompt_last) for k in turns[:-1]}
        a_f, b_f = reply_region(msgs, False, last, full)
        # where the last turn's own text starts in ``full``: after the longest tail of the prompt found before the reply
        head = full[:a_f]
        lo, hi = 0, len(prompt_last)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if prompt_last[len(prompt_last) - mid :] in head:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise DataError(
                f"{label}: cannot find the last assistant turn (messages[{last}]) after its prompt: the full rendering "
                "does not contain the prompt the template renders with add_generation_prompt=True"
            )
        x = head.rfind(prompt_last[len(prompt_last) - lo :]) + lo
        text = prompt_last + full[x:]
        shift = len(prompt_last) - x
        regions[last] = (a_f + shift, b_f + shift)
        b_last_full = b_f
    else:
        text = full
        regions = {k: reply_region(msgs, False, k, full) for k in turns}
        b_last_full = regions[last][1]

    cursor = 0
    for n, k in enumerate(turns):
        a, b = regions[k]
        m = msgs[k]
        reply = text[a:b]
        content = m.get("content") or ""
        where = f"{label}: assistant turn {n} (messages[{k}])"
        if a < cursor:
            raise DataError(f"{where} overlaps the previous turn in the rendering; check the template")
        if _visible(content) and _visible(content) not in reply:
            raise DataError(
                f"{where}: the template renders something else than the reply where the reply should be "
                f"({reply[:80]!r}); use a template that renders assistant contents as they are"
            )
        for name in _tool_names(m):
            if name not in reply:
                raise DataError(
                    f"{where}: the template does not render this turn's tool call {name!r}; use a template with tool "
                    "support (tool_calls), or leave tool turns out of the data"
                )
        own = content + str(m.get("reasoning_content") or "")
        for tok in headers:  # a role header inside the reply: the diff spread over other messages
            if reply.count(tok) > own.count(tok):
                raise DataError(f"{where}: the reply's span would contain the template's {tok!r}; the template cannot be aligned")
        # start: the end of this turn's generation prompt, when the text begins with it
        start = a
        prompt_k = prompt_last if k == last else render(msgs[:k], True, k - 1)
        if text.startswith(prompt_k) and cursor <= len(prompt_k) <= a:
            gap = text[len(prompt_k) : a]
            if not any(tok in gap for tok in headers):
                start = len(prompt_k)
        end = _marker_end(text, b, marks, headers, bool(_tool_names(m)))
        if end == b and k == last:
            # no marker after the final reply (Apertus writes <|assistant_end|> only before a next message):
            # take the one the template writes once the conversation goes on, or the model never learns to stop
            b_full = b_last_full
            try:
                cont = render(msgs + [{"role": "user", "content": SENTINEL}], False, last + 1)
            except DataError:
                cont = ""
            if cont.startswith(full[:b_full]):
                e_c = _marker_end(cont, b_full, marks, headers, bool(_tool_names(m)))
                if e_c > b_full:
                    text = text[:b] + cont[b_full:e_c] + text[b:]
                    end = b + (e_c - b_full)
        spans.append((start, end))
        cursor = end
    return ChatRendering(text, spans, turns)


def _marker_end(text: str, b: int, marks: Sequence[str], headers: set, tool_turn: bool) -> int:
    """End of the end-of-turn markers after a reply ending at ``b`` (``b`` if none).

    Whitespace may come first; for a tool-call turn, any text without a role header (the closing
    ``}]`` of the call). Adjacent markers chain (``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``).
    """
    j = b
    while j < len(text) and text[j] in " \t\r\n":
        j += 1
    if tool_turn:
        nxt = min((i for i in (text.find(mk, b) for mk in marks) if i >= 0), default=-1)
        if nxt >= 0 and not any(tok in text[b:nxt] for tok in headers):
            j = nxt
    end = b
    matched = True
    while matched:
        matched = False
        for mk in marks:
            if text.startswith(mk, j):
                j += len(mk)
                end = j
                matched = True
                break
    return end


def find_assistant_spans(tokenizer, messages: Sequence[dict], chat_template: Optional[str] = None, tools=None) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans with loss) of ``render_chat``."""
    r = render_chat(tokenizer, messages, chat_template, tools)
    return r.text, r.spans


def check_template_support(tokenizer, messages: Sequence[dict], chat_template: Optional[str], tools, text: str) -> None:
    """Refuse tools, tool results, reasoning or a system message the template would silently leave out."""
    label = _template_label(tokenizer, chat_template)
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        name = fn.get("name") if isinstance(fn, dict) else None
        if name and name not in text:
            raise DataError(
                f"{label} does not render the record's tools (tool {name!r} is missing from the rendering); use a "
                "template with tool support (apply_chat_template(tools=...)), or drop the tools field"
            )
    for i, m in enumerate(messages):
        role, content = m.get("role"), (m.get("content") or "")
        if role == "tool" and content.strip() and content.strip() not in text:
            raise DataError(f"{label} does not render tool results (messages[{i}]); use a template with tool support")
        if role == "system" and content.strip() and content.strip() not in text:
            raise DataError(
                f"{label} leaves the system message (messages[{i}]) out of the rendering; set data.system: "
                "merge_into_first_user (or drop) in the recipe"
            )
    reasoning = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and (m.get("reasoning_content") or "").strip()]
    if reasoning:
        i = reasoning[-1]
        if messages[i]["reasoning_content"].strip() not in text:
            raise DataError(
                f"{label} does not render reasoning_content (messages[{i}]); use a template with thinking support "
                "(e.g. Qwen3's), or put the reasoning in the content"
            )


# ------------------------------------------------------------------------------ tokenization
def mask_array_from_spans(offsets: np.ndarray, ids: np.ndarray, spans: Sequence[tuple[int, int]], special_ids) -> np.ndarray:
    """True for tokens that overlap a span; a special token only if it lies wholly inside one (numpy).

    ``offsets``: int [tokens, 2] character offsets; ``ids``: the token ids; ``spans``: sorted character
    spans; ``special_ids``: ids of special tokens (a set or an int array). A token that straddles a
    span's start (a merged BPE piece such as ``"\\n "``) carries loss: it holds the start of the reply.
    A special token never does unless the span holds all of it, so a role header is never trained
    on whatever whitespace the reply begins with. A zero-width token counts by its position.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if not len(sp) or not len(offsets):
        return np.zeros(len(offsets), dtype=bool)
    s, e = offsets[:, 0], offsets[:, 1]
    j = np.searchsorted(sp[:, 0], s, side="right") - 1
    jc, nxt = np.maximum(j, 0), np.minimum(j + 1, len(sp) - 1)
    in_j = (j >= 0) & (s < sp[jc, 1])
    zero_width = e <= s
    in_next = ~in_j & (j + 1 < len(sp)) & (sp[nxt, 0] < e)
    lo, hi = np.where(in_j, sp[jc, 0], sp[nxt, 0]), np.where(in_j, sp[jc, 1], sp[nxt, 1])
    special = _member(np.asarray(ids), special_ids)
    overlap = (in_j | in_next) & (~special | ((lo <= s) & (e <= hi)))
    return np.where(zero_width, in_j, overlap)


def _member(ids: np.ndarray, special_ids) -> np.ndarray:
    """``np.isin(ids, special_ids)`` by binary search in the few special ids (one pass instead of one per id)."""
    sid = np.sort(np.fromiter(special_ids, dtype=np.int64) if isinstance(special_ids, (set, frozenset))
                  else np.asarray(special_ids, dtype=np.int64).ravel())
    if not len(sid):
        return np.zeros(ids.shape, dtype=bool)
    ids = ids.astype(np.int64, copy=False)
    pos = np.minimum(np.searchsorted(sid, ids), len(sid) - 1)
    return sid[pos] == ids


def mask_from_spans(offsets: Sequence[tuple[int, int]], ids: Sequence[int], spans: Sequence[tuple[int, int]], special_ids: set) -> list[bool]:
    """``mask_array_from_spans`` as a list of bools."""
    return mask_array_from_spans(np.asarray(offsets, dtype=np.int64), np.asarray(ids, dtype=np.int64), spans, special_ids).tolist()


def special_token_ids(tokenizer) -> set:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def chat_for_training(tokenizer, messages: Sequence[dict], chat_template: Optional[str] = None, tools=None,
                      system: str = "keep", headers: Optional[set[str]] = None,
                      skeletons: Optional[TemplateSkeletons] = None) -> ChatRendering:
    """The conversation as trained on: system policy, ``render_chat``, then ``check_template_support``.

    What ``tokenize_chat`` tokenizes; ``affinage.data.tokenize`` does the same for a batch of them
    (passing ``headers`` and ``skeletons``, see ``render_chat``).
    """
    messages = apply_system_policy(messages, system)
    r = render_chat(tokenizer, messages, chat_template, tools, headers, skeletons)
    check_template_support(tokenizer, messages[: r.turns[-1] + 1], chat_template, tools, r.text)
    return r


def tokenize_chat(
    tokenizer, messages: Sequence[dict], max_length: int, chat_template: Optional[str] = None, tools=None, system: str = "keep"
) -> TokenizedSample:
    """Tokens of the rendered conversation and their loss mask (True on the assistant spans of ``render_chat``).

    Right-truncated to ``max_length``; ``truncated`` says whether it was cut. The caller drops
    samples left with no loss-bearing token.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is a slow tokenizer: loss masking needs offsets from a fast tokenizer (tokenizer.json)")
    r = chat_for_training(tokenizer, messages, chat_template, tools, system)
    enc = tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    mask = mask_from_spans(enc["offset_mapping"], ids, r.spans, special_token_ids(tokenizer))
    truncated = len(ids) > max_length
    return TokenizedSample(ids[:max_length], mask[:max_length], truncated)


# ---------------------------------------------------------------------------------- viewing
def loss_segments(tokenizer, input_ids: Sequence[int], loss_mask: Sequence) -> list[dict]:
    """The decoded sequence as ``[{"text", "loss"}]`` runs that cover it all (``affinage inspect``).

    Prefixes are decoded (not runs alone) so that sentencepiece word-initial spaces stay where they are.
    """
    on = [bool(x) for x in loss_mask]
    ids = [int(t) for t in input_ids]
    cuts = [k for k in range(1, len(on)) if on[k] != on[k - 1]] + [len(on)]
    out, prev_text, start = [], "", 0
    for k in cuts if on else []:
        text = tokenizer.decode(ids[:k])
        piece = text[len(prev_text):] if text.startswith(prev_text) else tokenizer.decode(ids[start:k])
        out.append({"text": piece, "loss": on[start]})
        prev_text, start = text, k
    return out


def decode_spans(tokenizer, sample: TokenizedSample) -> list[str]:
    """The loss-bearing parts of ``sample`` decoded, one string per contiguous run (for checks and debugging)."""
    runs: list[list[int]] = []
    prev = False
    for t, on in zip(sample.input_ids, sample.loss_mask):
        if on and not prev:
            runs.append([])
        if on:
            runs[-1].append(t)
        prev = bool(on)
    return [tokenizer.decode(r) for r in runs]


def render_loss_mask(tokenizer, sample: TokenizedSample) -> str:
    """The sample's text with loss-bearing parts wrapped in [[ ]], to eyeball a template's mask."""
    return "".join(f"[[{s['text']}]]" if s["loss"] else s["text"] for s in loss_segments(tokenizer, sample.input_ids, sample.loss_mask))
