"""Loss masking with the real Mistral v0.3, Qwen2.5 and Lucie tokenizers and templates (../shared)."""

from __future__ import annotations

import json
import random

import pytest

from affinage.data.errors import DataError
from affinage.data.formats import to_canonical
from affinage.data.templates import decode_spans, find_assistant_spans, tokenize_chat
from data_helpers import END_MARKER, REAL_TOKENIZERS, SHARED, TRIMS_CONTENT, needs_shared, real_tokenizer

pytestmark = [pytest.mark.shared, needs_shared]

SYSTEM = "Tu es un juriste français, précis et concis."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Qu'énonce l'article 1er du Code civil ?"},
    {"role": "assistant", "content": "Il fixe l'entrée en vigueur des lois : à la date qu'elles prévoient, ou le lendemain de leur publication."},
    {"role": "user", "content": "Et en cas d'urgence, que se passe-t-il ?"},
    {"role": "assistant", "content": "Les lois entrent en vigueur dès leur publication si le décret de promulgation le prescrit."},
    {"role": "user", "content": "Merci ! Peux-tu résumer en une phrase, sans accent oublié ?"},
    {"role": "assistant", "content": "Une loi s'applique à la date fixée, sinon le lendemain de sa publication ; l'urgence peut l'accélérer."},
]
USER_TEXTS = [m["content"] for m in CONVERSATION if m["role"] == "user"]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def expected_runs(name: str, answers) -> list[str]:
    return [(a.strip() if TRIMS_CONTENT[name] else a) + END_MARKER[name] for a in answers]


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
@pytest.mark.parametrize("with_system", [True, False], ids=["system", "no-system"])
def test_multiturn_labels_are_exactly_the_assistant_turns(name, with_system):
    tok = real_tokenizer(name)
    messages = CONVERSATION if with_system else CONVERSATION[1:]
    sample = tokenize_chat(tok, messages, max_length=4096)

    assert not sample.truncated
    assert len(sample.input_ids) == len(sample.loss_mask)
    runs = decode_spans(tok, sample)
    assert runs == expected_runs(name, ANSWERS)
    labelled = "".join(runs)
    for text in USER_TEXTS + [SYSTEM]:
        assert text not in labelled
    # every user turn (and the system prompt where the template renders it) is in the unlabelled part
    unlabelled = tok.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if not m])
    for text in USER_TEXTS:
        assert text in unlabelled
    if with_system:
        assert SYSTEM in unlabelled


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_token_ids_match_apply_chat_template(name):
    """Tokenizing our rendering gives exactly the ids transformers' own chat tokenization gives."""
    tok = real_tokenizer(name)
    messages = CONVERSATION[1:] if name.startswith("mistral") else CONVERSATION  # Mistral: see below
    ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert tokenize_chat(tok, messages, max_length=4096).input_ids == ids


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_spans_cover_content_plus_end_marker_only(name):
    tok = real_tokenizer(name)
    text, spans = find_assistant_spans(tok, CONVERSATION)
    assert len(spans) == 3
    assert [text[a:b].strip() for a, b in spans] == [a + END_MARKER[name] for a in ANSWERS]
    assert all(b <= a2 for (_, b), (a2, _) in zip(spans, spans[1:]))


def test_qwen_default_system_prompt_is_never_loss_bearing():
    tok = real_tokenizer("qwen2.5-instruct")
    sample = tokenize_chat(tok, CONVERSATION[1:], max_length=4096)
    full = tok.decode(sample.input_ids)
    assert "You are Qwen, created by Alibaba Cloud" in full  # injected by the template
    assert "Qwen" not in "".join(decode_spans(tok, sample))


def test_mistral_system_message_kept_in_last_user_turn_and_not_labelled():
    """Mistral v0.3 renders the system message only inside the LAST user turn, and only when the
    conversation ends with a user turn; rendering a finished conversation drops it. We train on the
    prompt the model sees at inference (system inside the last [INST]) plus the final answer."""
    tok = real_tokenizer("mistral-7b-instruct-v0.3")
    plain = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert SYSTEM not in plain  # the template's own full rendering loses it
    text, spans = find_assistant_spans(tok, CONVERSATION)
    assert text.count(SYSTEM) == 1
    assert text.index(SYSTEM) > text.index(USER_TEXTS[1])  # inside the last user turn
    assert all(not (a <= text.index(SYSTEM) < b) for a, b in spans)


def test_mistral_rejects_non_alternating_roles_with_template_and_turn():
    tok = real_tokenizer("mistral-7b-instruct-v0.3")
    bad = [
        {"role": "user", "content": "Bonjour"},
        {"role": "user", "content": "Tu es là ?"},
        {"role": "assistant", "content": "Oui."},
    ]
    with pytest.raises(DataError, match=r"mistral-7b-instruct-v0.3.*messages\[1\].*alternate"):
        tokenize_chat(tok, bad, max_length=64)


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_trailing_user_turn_is_left_out(name):
    tok = real_tokenizer(name)
    extra = CONVERSATION + [{"role": "user", "content": "Une dernière question sans réponse ?"}]
    a = tokenize_chat(tok, extra, max_length=4096)
    b = tokenize_chat(tok, CONVERSATION, max_length=4096)
    assert a.input_ids == b.input_ids and a.loss_mask == b.loss_mask


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_right_truncation_keeps_the_head_and_flags_it(name):
    tok = real_tokenizer(name)
    full = tokenize_chat(tok, CONVERSATION, max_length=4096)
    cut = tokenize_chat(tok, CONVERSATION, max_length=len(full.input_ids) - 5)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:-5]
    assert cut.loss_mask == full.loss_mask[:-5]


def piaf_conversations(n=50, seed=0):
    lines = (SHARED / "data" / "fr_instruct_piaf_qa.jsonl").read_text(encoding="utf-8").splitlines()
    picked = random.Random(seed).sample(lines, n)
    return [to_canonical(json.loads(line), "chat", where=f"piaf[{i}]")["messages"] for i, line in enumerate(picked)]


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_piaf_property_labels_are_the_answer(name):
    """The answer is an extractive span of the user's paragraph: it must be labelled in the reply only."""
    tok = real_tokenizer(name)
    for messages in piaf_conversations():
        sample = tokenize_chat(tok, messages, max_length=8192)
        answer = messages[-1]["content"]
        assert sample.num_loss_tokens > 0
        assert decode_spans(tok, sample) == expected_runs(name, [answer])
        # everything before the reply (which quotes the answer) is unlabelled
        first = sample.loss_mask.index(True)
        assert not any(sample.loss_mask[:first])
        assert messages[0]["content"].split("Question :")[1].strip()[:20] in tok.decode(sample.input_ids[:first])
