"""Named templates (chatml, llama3, mistral) and custom templates on a tokenizer
trained in the test (on ../shared legal text when present, else on a few lines written here)."""

from __future__ import annotations

import pytest

from affinage.data.errors import DataError
from affinage.data.templates import (
    NAMED_TEMPLATES,
    decode_spans,
    find_assistant_spans,
    missing_markers,
    render_loss_mask,
    resolve_chat_template,
    tokenize_chat,
)

SYSTEM = "Réponds en français, brièvement."
CONV = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Où se trouve la préfecture ?"},
    {"role": "assistant", "content": "Elle est près de la gare, à côté du théâtre."},
    {"role": "user", "content": "Et l'hôpital ?"},
    {"role": "assistant", "content": "L'hôpital est en face de la bibliothèque."},
]
ANSWERS = [m["content"] for m in CONV if m["role"] == "assistant"]
USERS = [m["content"] for m in CONV if m["role"] == "user"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("chatml", [a + "<|im_end|>" for a in ANSWERS]),
        ("llama3", [a + "<|eot_id|>" for a in ANSWERS]),
        ("mistral", [" " + a + "</s>" for a in ANSWERS]),  # byte-level BPE keeps the space before the reply
    ],
)
def test_named_template_masks_exactly_the_replies(trained_tokenizer, name, expected):
    resolve_chat_template(trained_tokenizer, name)
    assert trained_tokenizer.chat_template == NAMED_TEMPLATES[name]
    sample = tokenize_chat(trained_tokenizer, CONV, max_length=2048)
    runs = decode_spans(trained_tokenizer, sample)
    assert runs == expected
    for text in USERS + [SYSTEM]:
        assert text not in "".join(runs)
    unlabelled = trained_tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if not m])
    assert all(text in unlabelled for text in USERS + [SYSTEM])


def test_chatml_mask_render_is_readable(trained_tokenizer):
    sample = tokenize_chat(trained_tokenizer, CONV, 2048, chat_template=NAMED_TEMPLATES["chatml"])
    shown = render_loss_mask(trained_tokenizer, sample)
    assert f"<|im_start|>assistant\n[[{ANSWERS[0]}<|im_end|>]]\n<|im_start|>user" in shown


def test_no_template_is_a_clear_error(trained_tokenizer):
    with pytest.raises(DataError, match=r"model my-base has no chat template; set model.chat_template: chatml"):
        resolve_chat_template(trained_tokenizer, None, model_name="my-base")
    with pytest.raises(DataError, match="no chat template"):
        tokenize_chat(trained_tokenizer, CONV, 128)


def test_template_from_jinja_file_and_unknown_name(trained_tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(NAMED_TEMPLATES["chatml"], encoding="utf-8")
    assert resolve_chat_template(trained_tokenizer, str(path)) == NAMED_TEMPLATES["chatml"]
    assert trained_tokenizer.chat_template == NAMED_TEMPLATES["chatml"]
    with pytest.raises(DataError, match=r"neither a named template \(chatml, llama3, mistral\)"):
        resolve_chat_template(trained_tokenizer, "chatml2")


def test_missing_markers_warn(trained_tokenizer):
    assert missing_markers(trained_tokenizer, "chatml") == []
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bare = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "</s>": 2}, unk_token="<unk>"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=bare, eos_token="</s>", unk_token="<unk>")
    with pytest.warns(UserWarning, match=r"\['<\|im_start\|>', '<\|im_end\|>'\] are not single tokens"):
        resolve_chat_template(tok, "chatml")


def test_template_that_rerenders_earlier_turns(trained_tokenizer):
    """Turns numbered 'k/total': every earlier header changes as the conversation grows, so P_i is
    never a prefix of F_i. Spans are still found from the tail of the prompt."""
    numbered = (
        "{%- for m in messages %}{{- '### ' + m['role'] + ' ' + (loop.index|string) + '/' + (messages|length|string) + '\\n' + m['content'] + '</s>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '### assistant ' + ((messages|length + 1)|string) + '/' + ((messages|length + 1)|string) + '\\n' }}{%- endif %}"
    )
    text, spans = find_assistant_spans(trained_tokenizer, CONV, chat_template=numbered)
    assert [text[a:b] for a, b in spans] == [a + "</s>" for a in ANSWERS]
    sample = tokenize_chat(trained_tokenizer, CONV, 2048, chat_template=numbered)
    assert decode_spans(trained_tokenizer, sample) == [a + "</s>" for a in ANSWERS]


def test_template_that_loses_assistant_turns_names_template_and_turn(trained_tokenizer):
    users_only = (
        "{%- for m in messages %}{%- if m['role'] != 'assistant' %}{{- m['role'] + ': ' + m['content'] + '\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
    )
    with pytest.raises(DataError, match=r"the given chat template: cannot find assistant turn 0 \(messages\[2\]\)"):
        find_assistant_spans(trained_tokenizer, CONV, chat_template=users_only)


def test_named_mistral_rejects_non_alternating(trained_tokenizer):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(DataError, match=r"chat template 'mistral' failed .*alternate"):
        tokenize_chat(trained_tokenizer, bad, 64, chat_template=NAMED_TEMPLATES["mistral"])


def test_truncation_inside_the_reply_keeps_partial_labels(trained_tokenizer):
    full = tokenize_chat(trained_tokenizer, CONV[1:3], 2048, chat_template=NAMED_TEMPLATES["chatml"])
    first = full.loss_mask.index(True)
    cut = tokenize_chat(trained_tokenizer, CONV[1:3], first + 2, chat_template=NAMED_TEMPLATES["chatml"])
    assert cut.truncated and cut.num_loss_tokens == 2
    none_left = tokenize_chat(trained_tokenizer, CONV[1:3], first, chat_template=NAMED_TEMPLATES["chatml"])
    assert none_left.num_loss_tokens == 0


def test_mask_rule_overlap_and_special_tokens_only_when_inside():
    from affinage.data.templates import mask_from_spans

    offsets = [(0, 3), (3, 6), (6, 9), (9, 12), (12, 12), (14, 16)]
    ids = [10, 11, 12, 13, 14, 15]
    assert mask_from_spans(offsets, ids, [(4, 9), (12, 15)], set()) == [False, True, True, False, True, True]
    # token 11 (3, 6) straddles the span start: a plain token carries loss, a special one does not
    assert mask_from_spans(offsets, ids, [(4, 9), (12, 15)], {11, 15}) == [False, False, True, False, True, False]
    assert mask_from_spans(offsets, ids, [(3, 9)], {11}) == [False, True, True, False, False, False]


def test_prepare_names_record_turn_and_fix_when_the_template_refuses_a_system_message(trained_tokenizer, tmp_path):
    """Gemma-2-style template (written here) that raises on a system role: prepare stops with the
    file:line, the message index and the recipe key that fixes it; with that key the record trains."""
    import numpy as np

    from affinage.data.prepare import prepare
    from data_helpers import make_recipe, write_jsonl

    refuse = (
        "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    (tmp_path / "refuse.jinja").write_text(refuse, encoding="utf-8")
    data = write_jsonl(tmp_path / "a.jsonl", [{"messages": CONV}] * 4)
    src = [{"path": str(data), "name": "a"}]
    recipe = make_recipe(src, chat_template=str(tmp_path / "refuse.jinja"), max_length=256, num_proc=1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"a.jsonl:1: .*messages\[0\]: System role not supported.*data.system: merge_into_first_user"):
        prepare(recipe, trained_tokenizer, progress=False)
    fixed = make_recipe(src, chat_template=str(tmp_path / "refuse.jinja"), max_length=256, num_proc=1,
                        cache_dir=str(tmp_path / "c"), system="merge_into_first_user")
    cache = prepare(fixed, trained_tokenizer, progress=False)
    row = cache.train[0]
    ids, mask = row["input_ids"][: row["seq_lens"][0]], row["loss_mask"][: row["seq_lens"][0]]
    text = trained_tokenizer.decode(ids.tolist())
    assert text.startswith("<|im_start|>user\n" + SYSTEM + "\n\n" + USERS[0])
    assert trained_tokenizer.decode(ids[np.asarray(mask, bool)].tolist()) == "".join(a + "<|im_end|>" for a in ANSWERS)


def test_template_with_eos_only_after_the_last_message(trained_tokenizer):
    """The issue's case: EOS only at the very end, so an earlier reply renders differently in a
    prefix (where it is last) than in the whole conversation. Each reply is still found; the
    earlier ones carry no marker because the template writes none after them."""
    eos_at_end = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] }}{%- if not loop.last %}{{- '\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '\\n<|im_start|>assistant\\n' }}{%- else %}{{- eos_token }}{%- endif %}"
    )
    sample = tokenize_chat(trained_tokenizer, CONV, 2048, chat_template=eos_at_end)
    assert decode_spans(trained_tokenizer, sample) == [ANSWERS[0], ANSWERS[1] + "</s>"]


def test_reply_with_leading_whitespace_never_trains_the_role_header(trained_tokenizer):
    """The issue's other case: '<|assistant|>'-style header then a reply starting with blanks."""
    phi = (
        "{%- for m in messages %}{{- '<|' + m['role'] + '|>' + m['content'] + '<|im_end|>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
    )
    trained_tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    conv = [{"role": "user", "content": "Où ?"}, {"role": "assistant", "content": "   \n À Rennes."}]
    sample = tokenize_chat(trained_tokenizer, conv, 256, chat_template=phi)
    header = trained_tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert header in sample.input_ids
    assert not sample.loss_mask[sample.input_ids.index(header)]
    assert decode_spans(trained_tokenizer, sample) == ["   \n À Rennes.<|im_end|>"]
