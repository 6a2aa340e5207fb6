"""One rendering per conversation (``templates.TemplateSkeletons``): the same text, spans, ids and masks as before.

The reference is ``render_chat`` without skeletons, which renders the conversation once per
sentinel and per generation prompt (three times for one turn), and ``tokenize_chat`` on top of it.
The new path must give exactly the same ``ChatRendering`` and, through ``tokenize_chunk``, the
same token ids and loss masks, on the real templates (Lucie, Mistral v0.3, Qwen2.5 from
../shared, on PIAF and on multi-turn variants with and without a system message), the demo
model's template on the demo recipes' chat data, and the staged template zoo; and it must really
render each conversation once.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from affinage.data.formats import to_canonical
from affinage.data.templates import (NAMED_TEMPLATES, TemplateSkeletons, chat_for_training, end_markers,
                                     header_tokens, tokenize_chat)
from affinage.data.tokenize import fast_backend, tokenize_chunk
from data_helpers import REAL_TOKENIZERS, SHARED, needs_shared, real_tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes" / "demo"


class CountingTemplate:
    """Counts ``apply_chat_template`` calls on one tokenizer (instance attribute, removed on exit)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __enter__(self):
        inner = type(self.tok).apply_chat_template

        def counted(*a, **k):
            self.calls += 1
            return inner(self.tok, *a, **k)

        self.tok.apply_chat_template = counted
        return self

    def __exit__(self, *exc):
        del self.tok.apply_chat_template


def check_same(tok, conversations, max_length=4096) -> None:
    """The skeleton path equals the reference rendering by rendering, then token by token."""
    headers = header_tokens(tok, None, end_markers(tok))
    skel = TemplateSkeletons(tok)
    for messages in conversations:
        ref = chat_for_training(tok, messages)
        new = chat_for_training(tok, messages, headers=headers, skeletons=skel)
        assert (new.text, new.spans, new.turns) == (ref.text, ref.spans, ref.turns)
    chunk = [(i, f"c[{i}]", {"messages": m}) for i, m in enumerate(conversations)]
    for (idx, err, res), messages in zip(tokenize_chunk(tok, fast_backend(tok), "sft", max_length, "bfd", chunk), conversations):
        assert err is None, err
        ref = tokenize_chat(tok, messages, max_length)
        ((ids, mask),) = res.pieces
        assert ids.tolist() == ref.input_ids and mask.tolist() == ref.loss_mask


def variants(convs, rng) -> list[list[dict]]:
    """Each conversation as it is, with a system message, and as three turns (answers reused)."""
    out = []
    for m in convs:
        out.append(m)
        out.append([{"role": "system", "content": "Tu es un assistant français, précis et bref."}] + m)
        other = rng.choice(convs)
        out.append(m + other + [{"role": "user", "content": "Et pour conclure ?"}, m[-1]])
    return out


def piaf(n: int, seed: int = 0) -> list[list[dict]]:
    lines = (SHARED / "data" / "fr_instruct_piaf_qa.jsonl").read_text(encoding="utf-8").splitlines()
    return [to_canonical(json.loads(line), "chat", where=f"piaf[{i}]")["messages"]
            for i, line in enumerate(random.Random(seed).sample(lines, n))]


@pytest.mark.shared
@needs_shared
@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_real_templates_same_rendering_ids_and_masks(name):
    tok = real_tokenizer(name)
    check_same(tok, variants(piaf(30), random.Random(1)))
    # untrimmed replies: Mistral v0.3 and Lucie trim them, so their filled skeleton differs and they are rendered as before
    padded = [m[:-1] + [{"role": "assistant", "content": "  " + m[-1]["content"] + "\n"}] for m in piaf(10, seed=2)]
    check_same(tok, padded)


@pytest.mark.shared
@needs_shared
@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_each_conversation_is_rendered_once(name):
    tok = real_tokenizer(name)
    convs = variants(piaf(12, seed=3), random.Random(4))
    headers = header_tokens(tok, None, end_markers(tok))
    skel = TemplateSkeletons(tok)
    chat_for_training(tok, convs[0], headers=headers, skeletons=skel)  # skeletons of the three role sequences
    chat_for_training(tok, convs[1], headers=headers, skeletons=skel)
    chat_for_training(tok, convs[2], headers=headers, skeletons=skel)
    with CountingTemplate(tok) as c:
        for m in convs[3:]:
            chat_for_training(tok, m, headers=headers, skeletons=skel)
    assert c.calls == len(convs) - 3
    with CountingTemplate(tok) as c:
        for m in convs[3:]:
            chat_for_training(tok, m, headers=headers)
    assert c.calls >= 3 * (len(convs) - 3)  # the reference: the text, a sentinel per reply and a prompt per turn


def demo_conversations() -> list[list[dict]]:
    out = []
    for name, fmt in (("qa_culture.jsonl", "chat"), ("qa_alpaca.jsonl", "alpaca")):
        with open(DEMO / "data" / name, encoding="utf-8") as f:
            out += [to_canonical(json.loads(line), fmt, where=f"{name}:{i}")["messages"] for i, line in enumerate(f)]
    return out


def test_demo_recipe_data_same_rendering_ids_and_masks():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEMO / "model"))
    convs = demo_conversations()
    assert len(convs) > 50
    check_same(tok, convs, max_length=384)


def test_unusual_templates_same_rendering(trained_tokenizer):
    """A template that trims or tests a content (rendered as before), or ends a turn only before the next one."""
    convs = [[{"role": "user", "content": "  Où est la gare ?  "}, {"role": "assistant", "content": " Près du théâtre. \n"}],
             [{"role": "user", "content": "long"}, {"role": "assistant", "content": "Oui."}]]
    trim = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{%- endfor %}"
            "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    tests = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] == 'long' %}LONG{% else %}"
             "{{ m['content'] }}{% endif %}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    # the end marker only before a next message (as Apertus): the final turn's marker comes from a continued rendering
    before_next = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if not loop.last %}<|im_end|>\n"
                   "{% endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_end|>\n<|im_start|>assistant\n{%- endif %}")
    for template in (trim, tests, before_next, NAMED_TEMPLATES["chatml"], NAMED_TEMPLATES["llama3"], NAMED_TEMPLATES["mistral"]):
        trained_tokenizer.chat_template = template
        check_same(trained_tokenizer, convs)
