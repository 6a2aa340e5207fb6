"""The template zoo: real chat templates of the families French labs fine-tune, each masked right.

The template texts are public repository content staged outside this repository: in
``$AFFINAGE_TEMPLATE_ZOO`` (default ``~/.cache/affinage/template-zoo``, filled from PyPI by
``scripts/stage_template_zoo.py``, which CI runs) or ``../shared/templates/zoo``;
``templates/zoo/SOURCES.json`` here lists each one's repository, path, commit, licence and sha256,
which the test checks. A family whose file is staged nowhere is skipped with that reason. Each family gets a
byte-level or sentencepiece-style BPE trained in the test with the family's special tokens, so the
tokenization is realistic without any download.

The oracle is written from what each family's template is declared to do (below), not from our own
span finder: the loss-bearing tokens, decoded, are the reply (trimmed where the template trims it),
preceded by what the template puts between its generation prompt and the reply, followed by its
end-of-turn marker; no special token other than that marker ever carries loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from affinage.data.errors import DataError
from affinage.data.templates import decode_spans, special_token_ids, tokenize_chat
from affinage.data.tokenize import fast_backend, tokenize_chunk
from data_helpers import HAS_SHARED, SHARED, real_tokenizer, training_text

HERE = Path(__file__).parent
SOURCES = json.loads((HERE / "templates" / "zoo" / "SOURCES.json").read_text(encoding="utf-8"))["templates"]
ZOO_DIRS = [Path(os.environ.get("AFFINAGE_TEMPLATE_ZOO") or "~/.cache/affinage/template-zoo").expanduser(),
            SHARED / "templates" / "zoo"]
ZOO_REASON = ("the template is not staged: run scripts/stage_template_zoo.py (from PyPI), or put it in "
              f"{SHARED / 'templates' / 'zoo'}")


def zoo_file(name: str) -> Path | None:
    return next((d / f"{name}.jinja" for d in ZOO_DIRS if (d / f"{name}.jinja").is_file()), None)


@dataclass(frozen=True)
class Family:
    """What a family's template does with an assistant reply (declared from reading the template)."""

    end: str  # text after the reply that carries loss (end-of-turn marker, with any space the template puts before it)
    bos: str = "<s>"
    eos: str = "</s>"
    trim: str = "none"  # how the reply is rendered: none, strip, lstrip_nl (leading newlines dropped)
    lead: str = ""  # template text between the generation prompt and the reply (carries loss)
    last_lead: str | None = None  # ... for the final turn only, when it differs (Qwen3's closing </think>)
    last_trim: str | None = None
    sp: bool = False  # sentencepiece-style tokenizer (Llama 2, Mistral, Phi-3, Gemma) instead of byte-level
    system: str = "keep"  # keep: rendered; refuse: the template raises on a system message
    extra: tuple[str, ...] = field(default_factory=tuple)  # added (non-special) tokens: <think>, <tool_call>


FAMILIES: dict[str, Family] = {
    "llama2": Family(end=" </s>", trim="strip", lead=" ", sp=True),
    "llama3": Family(end="<|eot_id|>", bos="<|begin_of_text|>", eos="<|eot_id|>", trim="strip"),
    "llama4": Family(end="<|eot|>", bos="<|begin_of_text|>", eos="<|eot|>"),
    "mistral-v1": Family(end="</s>", lead=" ", sp=True),
    "mistral-v3": Family(end="</s>", trim="strip", lead=" ", sp=True),
    "mistral-nemo": Family(end="</s>"),
    "mistral-small-v7": Family(end="</s>"),
    "qwen2.5": Family(end="<|im_end|>", bos="<|endoftext|>", eos="<|im_end|>", extra=("<tool_call>", "</tool_call>")),
    "qwen3": Family(end="<|im_end|>", bos="<|endoftext|>", eos="<|im_end|>", last_lead="</think>\n\n", last_trim="lstrip_nl",
                    extra=("<think>", "</think>", "<tool_call>", "</tool_call>")),
    "gemma2": Family(end="<end_of_turn>", bos="<bos>", eos="<eos>", trim="strip", sp=True, system="refuse"),
    "gemma3": Family(end="<end_of_turn>", bos="<bos>", eos="<eos>", trim="strip", sp=True),
    "phi3": Family(end="<|end|>", eos="<|endoftext|>", sp=True),
    "phi3.5": Family(end="<|end|>", eos="<|endoftext|>", sp=True),
    "phi4": Family(end="<|im_end|>", bos="<|endoftext|>", eos="<|im_end|>"),
    "olmo2": Family(end="<|endoftext|>", bos="<|endoftext|>", eos="<|endoftext|>"),
    "granite3": Family(end="<|end_of_text|>", bos="<|end_of_text|>", eos="<|end_of_text|>"),
    "command-r": Family(end="<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", trim="strip"),
    "aya": Family(end="<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", trim="strip"),
    "command-a": Family(end="<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>"),
    "deepseek-v3": Family(end="<\uff5cend\u2581of\u2581sentence\uff5c>", bos="<\uff5cbegin\u2581of\u2581sentence\uff5c>",
                          eos="<\uff5cend\u2581of\u2581sentence\uff5c>"),
    "falcon-h1": Family(end="<|im_end|>", bos="<|begin_of_text|>", eos="<|end_of_text|>"),
    "zephyr": Family(end="</s>", trim="strip"),
    # verbatim templates of the model repositories (dates, default system prompts, tools, thinking)
    "llama3.1": Family(end="<|eot_id|>", bos="<|begin_of_text|>", eos="<|eot_id|>", trim="strip"),
    "llama3.2": Family(end="<|eot_id|>", bos="<|begin_of_text|>", eos="<|eot_id|>", trim="strip"),
    "smollm3": Family(end="<|im_end|>", bos="<|endoftext|>", eos="<|im_end|>", trim="lstrip_nl", extra=("<think>", "</think>")),
    "granite3.3": Family(end="<|end_of_text|>", bos="<|end_of_text|>", eos="<|end_of_text|>"),
    "mistral-small-3.2": Family(end="</s>"),
    "qwen3-hf": Family(end="<|im_end|>", bos="<|endoftext|>", eos="<|im_end|>", last_lead="<think>\n\n</think>\n\n",
                       last_trim="lstrip_nl", extra=("<think>", "</think>", "<tool_call>", "</tool_call>")),
    # Apertus writes <|assistant_end|> only before a following message: the final turn gets it too
    "apertus": Family(end="<|assistant_end|>", eos="<|assistant_end|>"),
    "phi3.5-hf": Family(end="<|end|>", eos="<|endoftext|>", sp=True),
    "gemma2-hf": Family(end="<end_of_turn>", bos="<bos>", eos="<eos>", trim="strip", sp=True, system="refuse"),
}
# Families tested with their real tokenizer and template from ../shared.
REAL = {
    "lucie": ("lucie-7b-instruct", Family(end="<|eot_id|>", trim="strip")),
    "mistral-v0.3-real": ("mistral-7b-instruct-v0.3", Family(end="</s>", trim="strip", lead=" ")),
    "qwen2.5-real": ("qwen2.5-instruct", Family(end="<|im_end|>")),
}

# Special tokens as templates write them: <|...|>, <｜...｜>, [INST]-style, <start_of_turn>...
_SPECIAL = re.compile(r"<\|[A-Za-z0-9_.\-]+\|>|<\uff5c[^<>\uff5c]{1,40}\uff5c>|\[/?[A-Z_]{3,}\]|<(?:start|end)_of_turn>")

SYSTEM = "Tu es un assistant juridique français : réponds avec précision."
USERS = ["Qu'énonce l'article 1er du Code civil ?", "Et en cas d'urgence ?", "Résume en une phrase, s'il te plaît."]
REPLIES = {
    "plain": ["Il fixe l'entrée en vigueur des lois.", "Elles entrent en vigueur dès leur publication.", "Une loi s'applique à la date fixée."],
    "whitespace": ["  Il fixe l'entrée en vigueur des lois.\n", "\n\nPremier point.\nSecond point.  ", "\tRésumé : la date fixée. \n\n"],
    "accents-emoji": ["Très bien 🇫🇷 — à bientôt, c'était génial 😀 !", "Œuvre, çà et là, où l'été s'achève… 🎉", "Ça marche ✅ : «guillemets» français."],
    "empty": ["Il fixe l'entrée en vigueur des lois.", "", "Une loi s'applique à la date fixée."],
}


def conversation(replies, turns: int, system: bool) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for u, a in list(zip(USERS, replies))[:turns]:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs


def expected_runs(fam: Family, replies: list[str]) -> list[str]:
    out = []
    for i, r in enumerate(replies):
        last = i == len(replies) - 1
        trim = fam.last_trim if last and fam.last_trim else fam.trim
        body = r.strip() if trim == "strip" else r.lstrip("\n") if trim == "lstrip_nl" else r
        lead = fam.last_lead if last and fam.last_lead is not None else fam.lead
        out.append(lead + body + fam.end)
    return out


_TOKENIZERS: dict = {}


def family_tokenizer(name: str):
    """A BPE trained on a few KB of French with the family's special tokens (0.1 s), and its template."""
    if name in REAL:
        tok = real_tokenizer(REAL[name][0])
        return tok, None
    path = zoo_file(name)
    if path is None:
        pytest.skip(f"{name}: {ZOO_REASON}")
    template = path.read_text(encoding="utf-8")
    assert hashlib.sha256(template.encode()).hexdigest() == SOURCES[name]["sha256"], f"{path} is not the file SOURCES.json lists"
    if name not in _TOKENIZERS:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        fam = FAMILIES[name]
        specials = ["<unk>", "<pad>", fam.bos, fam.eos] + sorted(set(_SPECIAL.findall(template)) | set(re.findall(r"<[^<>]+>", fam.end)))
        specials = list(dict.fromkeys(s for s in specials if s and s not in fam.extra))
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        if fam.sp:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
            tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
            chars = set(training_text() + SYSTEM + "".join(USERS) + "".join(r for rs in REPLIES.values() for r in rs) + string.printable + "\u2581")
            trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials, initial_alphabet=sorted(chars), show_progress=False)
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          show_progress=False)
        tok.train_from_iterator(training_text().splitlines(), trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos, unk_token="<unk>", pad_token="<pad>")
        fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (fam.bos, fam.eos, "<unk>", "<pad>")]})
        if fam.extra:
            fast.add_tokens(list(fam.extra))
        _TOKENIZERS[name] = fast
    tok = _TOKENIZERS[name]
    tok.chat_template = template
    return tok, template


def family(name: str) -> Family:
    return REAL[name][1] if name in REAL else FAMILIES[name]


def check_sample(tok, fam: Family, messages: list[dict], sample) -> None:
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = decode_spans(tok, sample)
    want = expected_runs(fam, replies)
    # an empty reply with no marker text of its own merges with nothing: one run per turn either way
    assert len(runs) == len(want), (runs, want)
    for run, exp in zip(runs, want):
        # exact from the first non-blank character on; at the start, one blank may differ (a BPE piece
        # merging the header's newline with the reply's first space, or sentencepiece's word-initial space)
        assert run.lstrip() == exp.lstrip(), (run, exp)
        assert abs((len(run) - len(run.lstrip())) - (len(exp) - len(exp.lstrip()))) <= 1, (run, exp)
    # no special token but the end marker ever carries loss: never a role header, BOS or generation prompt
    special = special_token_ids(tok)
    marker_ids = set(tok.convert_tokens_to_ids([t for t in re.findall(r"<[^<>]+>", fam.end)]))
    for t, on in zip(sample.input_ids, sample.loss_mask):
        if on and t in special:
            assert t in marker_ids, f"special token {tok.convert_ids_to_tokens(t)!r} carries loss"
    # the prompt side holds every user turn and the system prompt, none of which is in the loss
    loss_text = "".join(runs)
    prompt_text = tok.decode([t for t, on in zip(sample.input_ids, sample.loss_mask) if not on])
    for m in messages:
        if m["role"] in ("user", "system"):
            assert m["content"] not in loss_text
            assert m["content"].split()[0] in prompt_text


ALL = list(FAMILIES) + list(REAL)


def test_zoo_runs_at_least_twenty_real_templates_where_staged():
    """Where the zoo is staged (CI stages it from PyPI), at least 20 real templates really run."""
    staged = [n for n in FAMILIES if zoo_file(n) is not None] + (list(REAL) if HAS_SHARED else [])
    if not any(zoo_file(n) for n in FAMILIES):
        pytest.skip(ZOO_REASON)
    if not HAS_SHARED:
        pytest.skip("the families with their real tokenizers (Lucie, Mistral v0.3, Qwen2.5) need ../shared")
    assert len(staged) >= 20, f"only {len(staged)} templates staged: {', '.join(staged)}"


def test_zoo_has_twenty_families_with_sources():
    assert len(ALL) >= 20
    for name in FAMILIES:
        s = SOURCES[name]
        assert s["repository"].startswith("github:") and len(s["commit"]) == 40 and s["licence"], name
    assert "lucie" in SOURCES


@pytest.mark.parametrize("case", list(REPLIES))
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("name", ALL)
def test_zoo_masks_exactly_the_replies(name, system, case):
    if name in REAL and not HAS_SHARED:
        pytest.skip("needs ../shared (real tokenizers)")
    tok, template = family_tokenizer(name)
    fam = family(name)
    if system and fam.system == "refuse":
        pytest.skip("the template refuses a system message: see test_zoo_system_refused_names_the_fix")
    for turns in (1, 3):
        replies = REPLIES[case][:turns]
        if case == "empty" and turns == 1:
            replies = [""]
        messages = conversation(replies, turns, system)
        sample = tokenize_chat(tok, messages, max_length=1 << 20, chat_template=template)
        check_sample(tok, fam, messages, sample)
        # prepare's batched path (one rendering, the others from skeletons) gives the same ids and mask
        ((_, err, res),) = tokenize_chunk(tok, fast_backend(tok), "sft", 1 << 20, "bfd", [(0, "zoo", {"messages": messages})])
        assert err is None and res.pieces[0][0].tolist() == sample.input_ids and res.pieces[0][1].tolist() == sample.loss_mask


def test_zoo_system_refused_names_the_fix():
    tok, template = family_tokenizer("gemma2")
    messages = conversation(REPLIES["plain"], 2, True)
    with pytest.raises(DataError, match=r"messages\[0\].*System role not supported.*data.system: merge_into_first_user"):
        tokenize_chat(tok, messages, 4096, chat_template=template)
    sample = tokenize_chat(tok, messages, 4096, chat_template=template, system="merge_into_first_user")
    check_sample(tok, FAMILIES["gemma2"], messages[1:], sample)
    assert SYSTEM in tok.decode(sample.input_ids)
    dropped = tokenize_chat(tok, messages, 4096, chat_template=template, system="drop")
    assert SYSTEM not in tok.decode(dropped.input_ids)


def test_zoo_qwen3_reasoning_is_trained_on_the_last_turn_and_dropped_before():
    """Qwen3 renders reasoning_content only for turns after the last user query: earlier turns
    lose it in the text, so it carries no loss there; the last turn's thinking does."""
    tok, template = family_tokenizer("qwen3")
    messages = [
        {"role": "user", "content": USERS[0]},
        {"role": "assistant", "content": REPLIES["plain"][0], "reasoning_content": "L'article 1er, donc les lois."},
        {"role": "user", "content": USERS[1]},
        {"role": "assistant", "content": REPLIES["plain"][1], "reasoning_content": "Urgence : décret de promulgation."},
    ]
    sample = tokenize_chat(tok, messages, 4096, chat_template=template)
    runs = decode_spans(tok, sample)
    assert runs == [REPLIES["plain"][0] + "<|im_end|>",
                    "Urgence : décret de promulgation.\n</think>\n\n" + REPLIES["plain"][1] + "<|im_end|>"]
    assert "L'article 1er, donc" not in tok.decode(sample.input_ids)


def test_zoo_template_without_reasoning_support_refuses_reasoning():
    tok, template = family_tokenizer("llama3")
    messages = [{"role": "user", "content": USERS[0]},
                {"role": "assistant", "content": REPLIES["plain"][0], "reasoning_content": "Je réfléchis."}]
    with pytest.raises(DataError, match=r"does not render reasoning_content \(messages\[1\]\).*thinking support"):
        tokenize_chat(tok, messages, 4096, chat_template=template)


def test_zoo_final_marker_is_added_where_the_template_writes_it_only_before_a_next_message():
    tok, template = family_tokenizer("apertus")
    messages = conversation(REPLIES["plain"], 1, False)
    own = tok.apply_chat_template(messages, tokenize=False, chat_template=template)
    assert not own.rstrip().endswith("<|assistant_end|>")  # the template's own rendering never stops
    sample = tokenize_chat(tok, messages, 4096, chat_template=template)
    assert decode_spans(tok, sample) == [REPLIES["plain"][0] + "<|assistant_end|>"]


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "qwen3-hf", "mistral-v3", "mistral-nemo", "mistral-small-3.2", "llama3.1", "llama3"])
def test_zoo_tool_calls_carry_loss_and_tool_outputs_do_not(name):
    tok, template = family_tokenizer(name)
    tools = [{"type": "function", "function": {"name": "chercher_article", "description": "Cherche un article du Code civil",
                                               "parameters": {"type": "object", "properties": {"numero": {"type": "string"}}}}}]
    call = {"id": "call0000a", "type": "function", "function": {"name": "chercher_article", "arguments": {"numero": "1"}}}
    messages = [
        {"role": "user", "content": USERS[0]},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call0000a", "name": "chercher_article", "content": "Les lois sont exécutoires dans tout le territoire."},
        {"role": "assistant", "content": REPLIES["plain"][0]},
    ]
    if name == "llama3":  # Llama 3.0's template has no tool support: refused, not silently dropped
        with pytest.raises(DataError, match="tool"):
            tokenize_chat(tok, messages, 4096, chat_template=template, tools=tools)
        return
    sample = tokenize_chat(tok, messages, 4096, chat_template=template, tools=tools)
    runs = decode_spans(tok, sample)
    assert len(runs) == 2
    assert "chercher_article" in runs[0] and '"numero"' in runs[0]
    assert runs[1].lstrip() == expected_runs(FAMILIES[name], ["", REPLIES["plain"][0]])[-1].lstrip()
    assert runs[0].rstrip().endswith(FAMILIES[name].end)  # the call turn ends with its marker
    loss_text = "".join(runs)
    assert "exécutoires" not in loss_text  # the tool's output is prompt, not target
    assert "exécutoires" in tok.decode(sample.input_ids)
    assert "Cherche un article" not in loss_text
