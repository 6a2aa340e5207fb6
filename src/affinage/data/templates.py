"""Chat templates and the SFT loss mask: which tokens the model is trained to produce.

Real templates (Mistral v0.3, Qwen2.5, Lucie) have no ``{% generation %}`` markers, so the
assistant spans are found by rendering incremental prefixes of the conversation: for assistant
turn i, ``P_i`` = messages[:i] with the generation prompt and ``F_i`` = messages[:i+1] without it;
the assistant part (content plus the end-of-turn marker the template emits) is what ``F_i`` adds to
``P_i``. This works for any template that renders like the model sees at inference, with no
per-family rules. Tokens are then labelled from character offsets (fast tokenizers only).
"""

from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

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


def _render(tokenizer, messages: Sequence[dict], generation_prompt: bool, chat_template: Optional[str], label: str, turn: int) -> str:
    try:
        out = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt, chat_template=chat_template
        )
    except DataError:
        raise
    except Exception as e:  # jinja2 TemplateError, raise_exception(), missing template ...
        raise DataError(f"{label} failed to render the conversation up to messages[{turn}]: {e}") from None
    if not isinstance(out, str):
        raise DataError(f"{label}: apply_chat_template(tokenize=False) returned {type(out).__name__}, expected str")
    return out


# ------------------------------------------------------------------------------ span finding
def _assistant_start(prompt: str, full: str, content: str) -> Optional[int]:
    """Index in ``full`` where the assistant turn begins, given the rendered prompt before it.

    Normally ``prompt`` is a prefix of ``full``. Templates that render the last user turn
    differently when it is last (Mistral v0.3 puts the system message there) are handled by the
    longest tail of ``prompt`` found in ``full`` before the reply's content.
    """
    if full.startswith(prompt):
        return len(prompt)
    core = content.strip()
    limit = full.rfind(core) if core else len(full)
    if limit < 0:
        return None
    head = full[:limit]
    lo, hi = 0, len(prompt)  # longest m such that prompt[-m:] occurs in head (monotone in m)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt[len(prompt) - mid :] in head:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return None
    return head.rfind(prompt[len(prompt) - lo :]) + lo


def find_assistant_spans(tokenizer, messages: Sequence[dict], chat_template: Optional[str] = None) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return (text, character spans of the assistant turns).

    Each span covers the reply as the template renders it plus its end-of-turn marker
    (``</s>``, ``<|im_end|>``, ``<|eot_id|>``), without trailing whitespace. The text is the prompt
    for the last assistant turn followed by that turn, i.e. what the model sees at inference;
    messages after the last assistant turn carry no loss and are left out.
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        resolve_chat_template(tokenizer, None)  # raises the "no chat template" DataError
    label = _template_label(tokenizer, chat_template)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError("the conversation has no assistant turn, so nothing to train on")

    deltas: list[tuple[int, str, str, str]] = []  # (message index, prompt-side anchor, assistant part, F_i)
    prompt_last = full_last = ""
    start_last = 0
    for n, i in enumerate(turns):
        if i == 0:
            raise DataError(f"{label}: messages[0] is an assistant turn; a conversation must start with a user turn")
        prompt = _render(tokenizer, messages[:i], True, chat_template, label, i - 1)
        full = _render(tokenizer, messages[: i + 1], False, chat_template, label, i)
        start = _assistant_start(prompt, full, messages[i]["content"])
        delta = full[start:].rstrip() if start is not None else ""
        core = messages[i]["content"].strip()
        if start is None or not delta or (core and core not in delta):
            raise DataError(
                f"{label}: cannot find assistant turn {n} (messages[{i}]) in the rendering: the text the template adds "
                f"for this turn ({full[start or 0:][:80]!r}...) does not follow the prompt it renders with "
                "add_generation_prompt=True. Use a template whose generation prompt is the start of the assistant "
                "turn (e.g. model.chat_template: chatml)"
            )
        anchor = full[max(0, start - 32) : start]
        deltas.append((i, anchor, delta, full[:start]))
        prompt_last, full_last, start_last = prompt, full, start

    text = prompt_last + full_last[start_last:]
    spans: list[tuple[int, int]] = []
    cursor = 0
    for n, (i, anchor, delta, before) in enumerate(deltas):
        if n == len(deltas) - 1:
            pos = len(prompt_last)
        elif text.startswith(before) and text.startswith(delta, len(before)):
            pos = len(before)
        else:
            pos = text.find(anchor + delta, cursor)
            if pos >= 0:
                pos += len(anchor)
            else:
                pos = text.find(delta, cursor)
        if pos < cursor:
            raise DataError(
                f"{label}: assistant turn {n} (messages[{i}]) is rendered differently once later turns follow, so its "
                "span cannot be located in the full conversation; check the template or use a named one "
                "(model.chat_template: chatml)"
            )
        spans.append((pos, pos + len(delta)))
        cursor = pos + len(delta)
    return text, spans


# ------------------------------------------------------------------------------ tokenization
def _labels_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for tokens whose start falls in a span, or that straddle a span's start (merged BPE pieces)."""
    starts = [a for a, _ in spans]
    mask = []
    for s, e in offsets:
        j = bisect.bisect_right(starts, s) - 1
        inside = j >= 0 and s < spans[j][1]
        straddles = j + 1 < len(spans) and s < spans[j + 1][0] < e
        mask.append(inside or straddles)
    return mask


def tokenize_chat(tokenizer, messages: Sequence[dict], max_length: int, chat_template: Optional[str] = None) -> TokenizedSample:
    """Tokens of the rendered conversation and its loss mask (True on the assistant spans).

    Right-truncated to ``max_length``; ``truncated`` says whether it was cut. The caller drops
    samples left with no loss-bearing token.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is a slow tokenizer: loss masking needs offsets from a fast tokenizer (tokenizer.json)")
    text, spans = find_assistant_spans(tokenizer, messages, chat_template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    mask = _labels_from_spans(enc["offset_mapping"], spans)
    truncated = len(ids) > max_length
    return TokenizedSample(ids[:max_length], mask[:max_length], truncated)


def decode_spans(tokenizer, sample: TokenizedSample) -> list[str]:
    """The loss-bearing parts of ``sample`` decoded, one string per contiguous run (for checks and debugging)."""
    runs: list[list[int]] = []
    prev = False
    for t, on in zip(sample.input_ids, sample.loss_mask):
        if on and not prev:
            runs.append([])
        if on:
            runs[-1].append(t)
        prev = on
    return [tokenizer.decode(r) for r in runs]


def render_loss_mask(tokenizer, sample: TokenizedSample) -> str:
    """The sample's text with loss-bearing parts wrapped in [[ ]], to eyeball a template's mask."""
    on = list(sample.loss_mask)
    cuts = [k for k in range(1, len(on)) if on[k] != on[k - 1]] + [len(on)]
    out, prev_text, start = [], "", 0
    for k in cuts:
        text = tokenizer.decode(sample.input_ids[:k])  # decode prefixes: keeps sentencepiece spaces
        piece = text[len(prev_text):]
        out.append(f"[[{piece}]]" if on[start] else piece)
        prev_text, start = text, k
    return "".join(out)
