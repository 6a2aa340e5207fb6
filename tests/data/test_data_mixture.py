"""The mixture as ``prepare`` builds it: weights, held-out split, shuffling, statistics, failure modes.

Samples are read back from the cache (``cache_samples``: each row's segments in order); with
``packing: none`` and ``shuffle: false`` the rows follow the records.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from affinage.data.errors import DataError
from affinage.data.mixture import heldout_counts, weighted_indices
from affinage.data.prepare import prepare
from affinage.data.templates import TokenizedSample, decode_spans
from data_helpers import SHARED, make_recipe, needs_shared, real_tokenizer, write_jsonl


def cache_samples(split) -> list[TokenizedSample]:
    """Every segment of a cache split, rows in order, as samples (the first token of each never carries loss)."""
    out = []
    if split is None:
        return out
    for r in range(len(split)):
        row = split[r]
        pos = 0
        for n in row["seq_lens"]:
            out.append(TokenizedSample(row["input_ids"][pos : pos + n].tolist(), row["loss_mask"][pos : pos + n].astype(bool).tolist()))
            pos += n
    return out


def build(recipe, tok, tmp_path):
    """``prepare`` into a cache under ``tmp_path``; (cache, train samples, held-out samples)."""
    c = prepare(recipe, tok, root=tmp_path / "cache", num_proc=1, progress=False)
    return c, cache_samples(c.train), cache_samples(c.heldout)


def chat_records(tag: str, n: int, question_words: int = 1):
    return [
        {
            "messages": [
                {"role": "user", "content": f"Question {tag}{i} : où est la gare ?" + " Précise." * (question_words - 1)},
                {"role": "assistant", "content": f"Réponse {tag}{i} : près du théâtre."},
            ]
        }
        for i in range(n)
    ]


def answers(tok, samples) -> list[str]:
    """The record id (e.g. 'a3') each SFT sample answers, from its decoded loss-bearing tokens."""
    out = []
    for s in samples:
        (run,) = decode_spans(tok, s)
        out.append(re.match(r"Réponse (\w+) :", run).group(1))
    return out


def test_weighted_indices_and_heldout_counts():
    import random

    assert len(weighted_indices(10, 0.5, random.Random(0))) == 5
    assert sorted(weighted_indices(4, 2.0, random.Random(0))) == [0, 0, 1, 1, 2, 2, 3, 3]
    w = weighted_indices(10, 1.5, random.Random(0))
    assert len(w) == 15 and set(Counter(w).values()) <= {1, 2} and set(w) == set(range(10))
    assert weighted_indices(5, 0.5, random.Random(0)) == weighted_indices(5, 0.5, random.Random(0))
    assert len(weighted_indices(5, 0.5, random.Random(0))) == 3  # 2.5 rounds half up
    assert heldout_counts([100, 50], 0.1, None) == [10, 5]
    assert heldout_counts([100, 50], 0.1, 12) == [8, 4]
    assert heldout_counts([1, 3], 0.5, None) == [0, 2]  # at least one record stays in training


def test_mixture_weights_exact_counts(tmp_path, trained_tokenizer):
    sources = []
    for tag, weight in [("a", 0.5), ("b", 1.0), ("c", 2.0), ("d", 1.5)]:
        write_jsonl(tmp_path / f"{tag}.jsonl", chat_records(tag, 10))
        sources.append({"path": str(tmp_path / f"{tag}.jsonl"), "weight": weight, "name": tag})
    cache, train, heldout = build(make_recipe(sources, chat_template="chatml"), trained_tokenizer, tmp_path)

    used = {k: v["train_records_weighted"] for k, v in cache.stats["sources"].items()}
    assert used == {"a": 5, "b": 10, "c": 20, "d": 15}
    assert len(train) == 50 and heldout == [] and cache.heldout is None
    per_record = Counter(answers(trained_tokenizer, train))
    by_source = Counter(rec[0] for rec in per_record.elements())
    assert by_source == {"a": 5, "b": 10, "c": 20, "d": 15}
    assert all(per_record[f"c{i}"] == 2 for i in range(10))
    assert all(per_record[f"b{i}"] == 1 for i in range(10))
    assert sorted(Counter(per_record[f"d{i}"] for i in range(10)).items()) == [(1, 5), (2, 5)]


def test_heldout_disjoint_capped_and_deterministic(tmp_path, trained_tokenizer):
    write_jsonl(tmp_path / "q.jsonl", chat_records("q", 40))
    src = [{"path": str(tmp_path / "q.jsonl"), "weight": 2.0}]

    def split(seed, **kw):
        c, train, held = build(make_recipe(src, chat_template="chatml", seed=seed, heldout_fraction=0.25, **kw), trained_tokenizer, tmp_path)
        return (c, train), answers(trained_tokenizer, train), answers(trained_tokenizer, held)

    data, train, held = split(42)
    assert len(held) == 10 and len(set(held)) == 10
    assert len(train) == 60  # 30 training records, twice
    assert not set(train) & set(held)
    s = data[0].stats["sources"]["q.jsonl"]
    assert (s["records_read"], s["heldout_records"], s["train_records"], s["train_records_weighted"]) == (40, 10, 30, 60)

    again, train2, held2 = split(42)
    assert held2 == held and train2 == train and again[0].path == data[0].path
    assert [x.input_ids for x in again[1]] == [x.input_ids for x in data[1]]
    _, train3, held3 = split(7)
    assert set(held3) != set(held) and not set(train3) & set(held3)
    _, _, held_capped = split(42, heldout_max=3)
    assert len(held_capped) == 3


def test_shuffle_is_seeded_and_optional(tmp_path, trained_tokenizer):
    write_jsonl(tmp_path / "q.jsonl", chat_records("q", 12))
    src = [{"path": str(tmp_path / "q.jsonl")}]

    def order(**kw):
        return answers(trained_tokenizer, build(make_recipe(src, chat_template="chatml", packing="none", **kw), trained_tokenizer, tmp_path)[1])

    ordered = order(shuffle=False)
    assert ordered == [f"q{i}" for i in range(12)]
    a, b, c = order(seed=1), order(seed=1), order(seed=2)
    assert a == b and a != ordered and a != c and sorted(a) == sorted(ordered)


def test_stats_are_consistent_with_samples(tmp_path, trained_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", chat_records("a", 20))
    write_jsonl(tmp_path / "b.jsonl", chat_records("b", 9))
    src = [{"path": str(tmp_path / "a.jsonl"), "weight": 1.5}, {"path": str(tmp_path / "b.jsonl")}]
    cache, train, heldout = build(make_recipe(src, chat_template="chatml", heldout_fraction=0.2), trained_tokenizer, tmp_path)
    st = cache.stats
    json.dumps(st)  # written to data_stats.json as is
    for part, samples in (("train", train), ("heldout", heldout)):
        assert st["totals"][part]["samples"] == len(samples)
        assert st["totals"][part]["tokens"] == sum(len(s.input_ids) for s in samples)
        assert st["totals"][part]["loss_tokens"] == sum(s.num_loss_tokens for s in samples)
        assert sum(v[part]["tokens"] for v in st["sources"].values()) == st["totals"][part]["tokens"]
    a = st["sources"]["a.jsonl"]
    assert a["heldout_records"] == 4 and a["train_records"] == 16 and a["train_records_weighted"] == 24
    assert a["train"]["samples"] == 24 and a["format"] == "chat"
    assert st["sources"]["b.jsonl"]["heldout_records"] == 2  # 1.8 rounds to 2


def test_max_records_caps_reading(tmp_path, trained_tokenizer):
    write_jsonl(tmp_path / "q.jsonl", chat_records("q", 40))
    cache, train, _ = build(make_recipe([{"path": str(tmp_path / "q.jsonl"), "max_records": 7}], chat_template="chatml",
                                        shuffle=False, packing="none"), trained_tokenizer, tmp_path)
    assert cache.stats["sources"]["q.jsonl"]["records_read"] == 7
    assert answers(trained_tokenizer, train) == [f"q{i}" for i in range(7)]


def test_truncation_and_dropped_samples_are_counted(tmp_path, trained_tokenizer):
    recs = chat_records("s", 6) + chat_records("l", 4, question_words=60)  # long questions leave no room for the reply
    write_jsonl(tmp_path / "m.jsonl", recs)
    cache, train, _ = build(make_recipe([{"path": str(tmp_path / "m.jsonl"), "weight": 2.0}], chat_template="chatml", max_length=64),
                            trained_tokenizer, tmp_path)
    t = cache.stats["sources"]["m.jsonl"]["train"]
    assert t["dropped_no_loss"] == 8 and t["truncated"] == 8
    assert t["samples"] == 12 == len(train)
    assert all(len(s.input_ids) <= 64 and s.num_loss_tokens > 0 for s in train)


def test_skip_mode_reports_bad_lines_and_error_mode_stops(tmp_path, trained_tokenizer):
    p = tmp_path / "m.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in chat_records("q", 5)]
    lines.insert(2, "{pas du json")
    lines.insert(4, json.dumps({"messages": [{"role": "user", "content": "seul"}]}))
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    src = [{"path": str(p)}]
    with pytest.raises(DataError, match=re.escape(f"{p}:3:") + " not valid JSON"):
        build(make_recipe(src, chat_template="chatml"), trained_tokenizer, tmp_path)
    cache, train, _ = build(make_recipe(src, chat_template="chatml", on_bad_record="skip"), trained_tokenizer, tmp_path)
    sk = cache.stats["sources"]["m.jsonl"]["skipped"]
    assert sk["count"] == 2 and sk["reasons"] == {"bad JSON": 1, "no assistant turn": 1}
    assert sk["examples"][0].startswith(f"{p}:3:") and sk["examples"][1].startswith(f"{p}:5:")
    assert len(train) == 5


def test_template_failures_are_skippable(tmp_path, trained_tokenizer):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
    write_jsonl(tmp_path / "m.jsonl", chat_records("q", 3) + [bad])
    src = [{"path": str(tmp_path / "m.jsonl")}]
    with pytest.raises(DataError, match=r"m.jsonl:4: chat template 'mistral' failed"):
        build(make_recipe(src, chat_template="mistral"), trained_tokenizer, tmp_path)
    cache, train, _ = build(make_recipe(src, chat_template="mistral", on_bad_record="skip"), trained_tokenizer, tmp_path)
    assert cache.stats["sources"]["m.jsonl"]["skipped"]["reasons"] == {"chat template error": 1}
    assert len(train) == 3


def test_task_and_format_mismatches(tmp_path, trained_tokenizer):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "Bonjour à tous."}])
    write_jsonl(tmp_path / "c.jsonl", chat_records("q", 2))
    with pytest.raises(DataError, match=r"model tiny has no chat template"):
        build(make_recipe([{"path": str(tmp_path / "c.jsonl")}]), trained_tokenizer, tmp_path)
    with pytest.raises(DataError, match=r"holds raw text .* but task is sft"):
        build(make_recipe([{"path": str(tmp_path / "t.jsonl")}], chat_template="chatml"), trained_tokenizer, tmp_path)
    with pytest.raises(DataError, match=r"holds chat records .* but task is cpt"):
        build(make_recipe([{"path": str(tmp_path / "c.jsonl")}], task="cpt"), trained_tokenizer, tmp_path)
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"gave no usable record \(it is empty\)"):
        build(make_recipe([{"path": str(tmp_path / "e.jsonl")}], task="cpt"), trained_tokenizer, tmp_path)


def test_cpt_chunks_and_duplicate_source_names(tmp_path, trained_tokenizer):
    texts = [{"text": "Le tribunal a rendu sa décision. " * k} for k in (1, 5, 20)]
    write_jsonl(tmp_path / "t.jsonl", texts)
    src = [{"path": str(tmp_path / "t.jsonl")}, {"path": str(tmp_path / "t.jsonl"), "weight": 2.0}]
    cache, train, _ = build(make_recipe(src, task="cpt", max_length=32, shuffle=False, packing="none"), trained_tokenizer, tmp_path)
    assert list(cache.stats["sources"]) == ["t.jsonl", "t.jsonl#2"]
    one = cache.stats["sources"]["t.jsonl"]["train"]
    lengths = [len(trained_tokenizer(t["text"], add_special_tokens=False)["input_ids"]) + 2 for t in texts]
    assert one["tokens"] == sum(lengths)
    assert one["samples"] == sum(-(-n // 32) for n in lengths)
    assert one["loss_tokens"] == one["tokens"] - one["samples"]  # every token a target but each piece's first
    assert one["split_documents"] == sum(1 for n in lengths if n > 32)
    assert cache.stats["sources"]["t.jsonl#2"]["train"]["tokens"] == 2 * one["tokens"]
    assert all(all(s.loss_mask[1:]) and len(s.input_ids) <= 32 for s in train)
    assert train[0].input_ids[0] == trained_tokenizer.bos_token_id


@pytest.mark.shared
@needs_shared
def test_real_corpora_sft_and_cpt(tmp_path):
    piaf = str(SHARED / "data" / "fr_instruct_piaf_qa.jsonl")
    legal = str(SHARED / "data" / "fr_legal_codes.jsonl")
    tok = real_tokenizer("qwen2.5-instruct")
    sft, sft_train, _ = build(
        make_recipe([{"path": piaf, "max_records": 150, "name": "piaf"}], heldout_fraction=0.1, max_length=512), tok, tmp_path
    )
    s = sft.stats["sources"]["piaf"]
    assert s["records_read"] == 150 and s["heldout_records"] == 15 and s["format"] == "chat"
    assert s["train"]["samples"] + s["train"]["dropped_no_loss"] == 135
    assert sum(len(x.input_ids) for x in sft_train) == sft.stats["totals"]["train"]["tokens"]
    assert all(0 < x.num_loss_tokens < len(x.input_ids) <= 512 for x in sft_train)

    lucie = real_tokenizer("lucie-7b-instruct")
    cpt, cpt_train, _ = build(make_recipe([{"path": legal, "max_records": 60}], task="cpt", max_length=128, packing="none"), lucie, tmp_path)
    c = cpt.stats["sources"]["fr_legal_codes.jsonl"]
    assert c["records_read"] == 60 and c["train"]["split_documents"] > 0 and c["train"]["truncated"] == 0
    assert c["train"]["tokens"] == sum(len(x.input_ids) for x in cpt_train)
    starts = sum(1 for x in cpt_train if x.input_ids[0] == lucie.bos_token_id)
    assert starts == 60  # one BOS per document, never per chunk
