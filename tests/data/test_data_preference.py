"""Preference data: formats, the completion span on real templates, truncation, the prepared cache."""

from __future__ import annotations

import json

import pytest

from affinage.data.errors import DataError
from affinage.data.preference import Truncation, to_preference, tokenize_completion, tokenize_record
from affinage.data.templates import tokenize_chat
from data_helpers import END_MARKER, REAL_TOKENIZERS, TRIMS_CONTENT, needs_shared, real_tokenizer

SYSTEM = "Vous êtes l'agent d'accueil d'une mairie."
Q = "Comment renouveler ma carte d'identité ?"
GOOD = "Vous pouvez prendre rendez-vous en mairie avec votre ancienne carte."
BAD = "Tu vas à la mairie avec ta vieille carte."


# ----------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("record", [
    {"prompt": Q, "chosen": GOOD, "rejected": BAD, "system": SYSTEM},
    {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q}],
     "chosen": [{"role": "assistant", "content": GOOD}], "rejected": [{"role": "assistant", "content": BAD}]},
    {"chosen": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}],
     "rejected": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q}, {"role": "assistant", "content": BAD}]},
    {"conversations": [{"from": "human", "value": Q}], "system": SYSTEM,
     "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
], ids=["strings+system", "messages", "implicit-prompt", "sharegpt"])
def test_every_paired_format_gives_the_same_canonical_record(record):
    out = to_preference(record, "auto", "f.jsonl:3")
    assert out == {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q}], "chosen": GOOD, "rejected": BAD}


def test_unpaired_formats_and_multiturn_prompt():
    a = to_preference({"prompt": Q, "completion": GOOD, "label": True}, "auto", "x")
    b = to_preference({"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": BAD}], "kto_tag": 0}, "auto", "x")
    assert a == {"prompt": [{"role": "user", "content": Q}], "completion": GOOD, "label": True}
    assert b["label"] is False and b["completion"] == BAD
    multi = to_preference({"prompt": [{"role": "user", "content": "Bonjour."}, {"role": "assistant", "content": "Bonjour, je vous écoute."},
                                      {"role": "user", "content": Q}], "chosen": GOOD, "rejected": BAD}, "preference", "x")
    assert [m["role"] for m in multi["prompt"]] == ["user", "assistant", "user"]


@pytest.mark.parametrize("record, needle", [
    ({"prompt": Q, "chosen": GOOD}, "expected 'chosen' and 'rejected'"),
    ({"prompt": Q, "chosen": GOOD, "rejected": GOOD}, "same text"),
    ({"prompt": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}], "chosen": GOOD, "rejected": BAD}, "end with a user turn"),
    ({"prompt": Q, "chosen": [{"role": "assistant", "content": GOOD}, {"role": "user", "content": "?"}], "rejected": BAD}, "one assistant reply"),
    ({"prompt": Q, "completion": GOOD, "label": "oui"}, "true or false"),
    ({"prompt": Q, "completion": "  ", "label": True}, "empty"),
])
def test_bad_records_name_the_file_line_and_the_problem(record, needle):
    with pytest.raises(DataError) as e:
        to_preference(record, "auto", "prefs.jsonl:12")
    assert "prefs.jsonl:12" in str(e.value) and needle in str(e.value)


# -------------------------------------------------------------------------------- truncation
def test_truncation_keeps_the_end_of_the_prompt_then_cuts_completions():
    t = Truncation(max_length=10, max_prompt_length=4, policy="keep_prompt_end")
    assert t.apply([1, 2, 3], [[4, 5], [6]]) == ([1, 2, 3], [[4, 5], [6]], False, False)
    # prompt cut from the left only as far as the completions need
    assert t.apply(list(range(8)), [[100, 101, 102], [200]]) == (list(range(1, 8)), [[100, 101, 102], [200]], True, False)
    # long completions: the prompt keeps max_prompt_length tokens (its end), completions are cut at the end
    p, c, pc, cc = t.apply(list(range(8)), [list(range(100, 109)), [200, 201]])
    assert p == [4, 5, 6, 7] and c == [[100, 101, 102, 103, 104, 105], [200, 201]] and pc and cc
    assert Truncation(10, 4, "drop").apply(list(range(8)), [[1, 2, 3]]) is None


# ------------------------------------------------------------------- real templates (../shared)
@needs_shared
@pytest.mark.shared
@pytest.mark.parametrize("name", REAL_TOKENIZERS)
@pytest.mark.parametrize("multiturn", [False, True], ids=["one-turn", "multi-turn"])
def test_completion_tokens_are_exactly_the_sft_assistant_span(name, multiturn):
    """Prompt tokens never carry loss: the completion is the last assistant span SFT would train on."""
    tok = real_tokenizer(name)
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q}]
    if multiturn:
        prompt += [{"role": "assistant", "content": "Bien sûr. Avez-vous votre ancienne carte ?"}, {"role": "user", "content": "Oui."}]
    for reply in (GOOD, BAD):
        p_ids, c_ids = tokenize_completion(tok, prompt, reply)
        expected = (reply.strip() if TRIMS_CONTENT[name] else reply) + END_MARKER[name]
        assert tok.decode(c_ids).strip() == expected
        sft = tokenize_chat(tok, prompt + [{"role": "assistant", "content": reply}], max_length=4096)
        assert sft.input_ids[: len(p_ids) + len(c_ids)] == p_ids + c_ids
        last = [i for i, on in enumerate(sft.loss_mask) if on]
        n_turns = 2 if multiturn else 1
        span = last[-len(c_ids):]
        assert span == list(range(len(p_ids), len(p_ids) + len(c_ids)))  # SFT's loss positions of the last turn
        assert sum(sft.loss_mask[: len(p_ids)]) == (len(last) - len(c_ids)) * (n_turns > 1)
    a, _ = tokenize_record(tok, {"prompt": prompt, "chosen": GOOD, "rejected": BAD}, Truncation(4096, 2048, "keep_prompt_end"))
    assert a["prompt_ids"] == tokenize_completion(tok, prompt, GOOD)[0]


# ----------------------------------------------------------------------------------- prepare
def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _recipe(tmp_path, src, task="dpo", **pref):
    from affinage.recipe.loader import load_recipe_dict

    return load_recipe_dict({
        "name": "p", "task": task, "model": {"name_or_path": str(tmp_path / "unused")},
        "method": {"kind": "lora"},
        "data": {"sources": [{"path": str(src), "format": "auto"}], "max_length": 128, "heldout_fraction": 0.25,
                 "filters": {"exact_dedup": True}, "cache_dir": str(tmp_path / "cache")},
        "training": {"global_batch_size": 2, "duration": "2 steps"},
        "preference": {"max_prompt_length": 32, **pref},
    })


def test_prepare_dedups_truncates_counts_and_hits_the_cache(tmp_path, tiny_llama_dir):
    from affinage.data.prepare import prepare
    from affinage.model.load import load_tokenizer_folder

    tok = load_tokenizer_folder(tiny_llama_dir)
    long_q = " ".join(["Pourriez-vous m'expliquer la procédure en détail ?"] * 8)
    rows = [{"prompt": f"{Q} ({i})", "chosen": GOOD, "rejected": BAD} for i in range(10)]
    rows += [rows[0]]  # exact duplicate
    rows += [{"prompt": long_q, "chosen": GOOD + " " + GOOD, "rejected": BAD}]
    src = _write(tmp_path / "prefs.jsonl", rows)
    recipe = _recipe(tmp_path, src)
    cache = prepare(recipe, tok)
    s = cache.stats["sources"]["prefs.jsonl"]
    assert s["records_read"] == 12 and s["filters"] == {"exact_duplicate": {"dropped": 1}} and s["documents_kept"] == 11
    assert len(cache.train) + len(cache.heldout) == 11 and len(cache.heldout) == 3
    tot = cache.stats["totals"]
    assert tot["train"]["prompt_truncated"] + tot["heldout"]["prompt_truncated"] == 1
    for split in (cache.train, cache.heldout):
        for i in range(len(split)):
            x = split[i]
            assert len(x["prompt_ids"]) + max(len(x["chosen_ids"]), len(x["rejected_ids"])) <= 128
            assert x["chosen_ids"] != x["rejected_ids"]
    again = prepare(recipe, tok)
    assert again.hit and again.path == cache.path
    dropped = prepare(_recipe(tmp_path, src, truncation="drop"), tok)
    assert dropped.path != cache.path
    assert sum(dropped.stats["totals"][k]["dropped_too_long"] for k in ("train", "heldout")) == 1


def test_kto_unpairs_training_pairs_and_keeps_heldout_pairs(tmp_path, tiny_llama_dir):
    from affinage.data.prepare import prepare
    from affinage.model.load import load_tokenizer_folder

    tok = load_tokenizer_folder(tiny_llama_dir)
    src = _write(tmp_path / "prefs.jsonl", [{"prompt": f"{Q} ({i})", "chosen": GOOD, "rejected": BAD} for i in range(8)])
    cache = prepare(_recipe(tmp_path, src, task="kto"), tok)
    assert cache.train.kind == "unpaired" and len(cache.train) == 12  # 6 training pairs → 12 examples
    assert sorted(cache.train[i]["label"] for i in range(12)) == [False] * 6 + [True] * 6
    assert cache.heldout.kind == "paired" and len(cache.heldout) == 2


def test_dpo_refuses_unpaired_data(tmp_path, tiny_llama_dir):
    from affinage.data.prepare import prepare
    from affinage.model.load import load_tokenizer_folder

    src = _write(tmp_path / "u.jsonl", [{"prompt": Q, "completion": GOOD, "label": True}] * 3)
    with pytest.raises(DataError, match="use task: kto"):
        prepare(_recipe(tmp_path, src), load_tokenizer_folder(tiny_llama_dir))


def test_inspect_shows_each_pair_with_only_the_completions_marked(tmp_path, tiny_llama_dir):
    import io

    from affinage.inspect_data import run_inspect

    src = _write(tmp_path / "prefs.jsonl", [{"prompt": f"{Q} ({i})", "chosen": GOOD, "rejected": BAD} for i in range(4)])
    recipe = _recipe(tmp_path, src).model_copy(update={"model": _recipe(tmp_path, src).model.model_copy(
        update={"name_or_path": str(tiny_llama_dir)})})
    out = io.StringIO()
    assert run_inspect(recipe, samples=2, out=out, colour=False) == 0
    text = out.getvalue()
    assert text.count("── example") == 2 and text.count("·· chosen") == 2 and text.count("·· rejected") == 2
    assert f"[[{GOOD}<|im_end|>]]" in text and f"[[{BAD}<|im_end|>]]" in text
    assert "[[<|im_start|>" not in text and f"[[{Q}" not in text  # the prompt never carries loss
