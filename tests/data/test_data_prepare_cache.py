"""prepare(): cache keys, hits and misses, what the cache holds, statistics."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import numpy as np
import pytest

from affinage.data.cache import PreparedCache, key_of
from affinage.data.cache_key import cache_key_inputs
from affinage.data.prepare import prepare
from data_helpers import make_recipe, write_jsonl
from data_oracle import build_datasets


def chat(tag: str, n: int, extra: str = ""):
    return [
        {"messages": [
            {"role": "user", "content": f"Question {tag}{i} : où se trouve la gare de la ville numéro {i} ?{extra}"},
            {"role": "assistant", "content": f"Réponse {tag}{i} : elle est près du théâtre."},
        ]}
        for i in range(n)
    ]


def texts(n: int, words: int = 40):
    base = "le tribunal a rendu sa décision après une longue délibération des parties entendues".split()
    return [{"text": f"Document {i}. " + " ".join(base[(i + k) % len(base)] for k in range(words + i % 17))} for i in range(n)]


def sft_recipe(tmp_path, n=30, **data):
    path = tmp_path / "a.jsonl"
    if not path.exists():
        write_jsonl(path, chat("a", n))
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    data.setdefault("num_proc", 1)
    return make_recipe([{"path": str(path), "name": "a"}], chat_template="chatml", max_length=128, **data)


def key(recipe, tok):
    return key_of(cache_key_inputs(recipe, tok))


def test_key_changes_with_every_input_and_only_then(tmp_path, trained_tokenizer):
    r = sft_recipe(tmp_path)
    k0 = key(r, trained_tokenizer)
    assert key(sft_recipe(tmp_path), trained_tokenizer) == k0  # same recipe, same key
    assert key(sft_recipe(tmp_path, num_proc=2), trained_tokenizer) == k0  # how, not what: not in the key
    assert key(sft_recipe(tmp_path, cache_dir=str(tmp_path / "elsewhere")), trained_tokenizer) == k0
    changed = {
        "max_length": make_recipe([{"path": str(tmp_path / "a.jsonl"), "name": "a"}], chat_template="chatml",
                                  max_length=256, cache_dir=str(tmp_path / "cache")),
        "packing": sft_recipe(tmp_path, packing="none"),
        "filters": sft_recipe(tmp_path, filters={"exact_dedup": True}),
        "heldout": sft_recipe(tmp_path, heldout_fraction=0.1),
        "template": make_recipe([{"path": str(tmp_path / "a.jsonl"), "name": "a"}], chat_template="llama3",
                                max_length=128, cache_dir=str(tmp_path / "cache")),
        "seed": make_recipe([{"path": str(tmp_path / "a.jsonl"), "name": "a"}], chat_template="chatml", seed=1,
                            max_length=128, cache_dir=str(tmp_path / "cache")),
        "weight": make_recipe([{"path": str(tmp_path / "a.jsonl"), "name": "a", "weight": 2}], chat_template="chatml",
                              max_length=128, cache_dir=str(tmp_path / "cache")),
    }
    keys = {name: key(rec, trained_tokenizer) for name, rec in changed.items()}
    assert k0 not in keys.values() and len(set(keys.values())) == len(keys), keys

    # the tokenizer: another special token changes the key
    other = trained_tokenizer.__class__(tokenizer_object=trained_tokenizer.backend_tokenizer, bos_token="<s>",
                                        eos_token="<pad>", pad_token="<pad>", unk_token="<unk>")
    assert key(r, other) != k0
    # the content of a source file (same path, same size)
    path = tmp_path / "a.jsonl"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("gare", "Gare", 1), encoding="utf-8")
    assert key(r, trained_tokenizer) != k0
    path.write_text(text, encoding="utf-8")
    assert key(r, trained_tokenizer) == k0


def test_hit_is_fast_and_a_changed_input_rebuilds(tmp_path, trained_tokenizer):
    r = sft_recipe(tmp_path)
    first = prepare(r, trained_tokenizer, progress=False)
    assert not first.hit and first.train.num_tokens > 0
    t = time.perf_counter()
    again = prepare(r, trained_tokenizer, progress=False)
    assert again.hit and again.path == first.path
    assert time.perf_counter() - t < 1.0
    # nothing half-written is left beside the cache
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".") and p.is_dir()] == [first.path.name]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name.startswith(".")]
    # append a record: a new key and a new folder, the old one untouched
    write_jsonl(tmp_path / "a.jsonl", chat("a", 31))
    third = prepare(r, trained_tokenizer, progress=False)
    assert not third.hit and third.path != first.path
    assert third.stats["sources"]["a"]["records_read"] == 31 and first.stats["sources"]["a"]["records_read"] == 30
    assert PreparedCache.open(first.path).train.num_tokens == first.train.num_tokens


@pytest.mark.parametrize("packing", ["bfd", "none"])
def test_cache_rows_hold_exactly_the_samples_of_the_oracle(tmp_path, trained_tokenizer, packing):
    """Same split, same weights: every sample appears in the rows as often as the in-memory oracle uses it."""
    write_jsonl(tmp_path / "a.jsonl", chat("a", 20))
    write_jsonl(tmp_path / "b.jsonl", chat("b", 12, extra=" Réponds en une phrase."))
    sources = [{"path": str(tmp_path / "a.jsonl"), "name": "a", "weight": 1.5}, {"path": str(tmp_path / "b.jsonl"), "name": "b"}]
    r = make_recipe(sources, chat_template="chatml", max_length=200, heldout_fraction=0.2, packing=packing,
                    cache_dir=str(tmp_path / "cache"), num_proc=2)
    cache = prepare(r, trained_tokenizer, progress=False)
    ref = build_datasets(r, trained_tokenizer)

    def segments(split):
        out = []
        for i in range(len(split)):
            row = split[i]
            assert len(row["input_ids"]) <= 200
            pos = 0
            for n in row["seq_lens"]:
                ids = tuple(int(x) for x in row["input_ids"][pos : pos + n])
                mask = tuple(int(x) for x in row["loss_mask"][pos : pos + n])
                out.append((ids, mask))
                pos += n
        return Counter(out)

    def expected(samples):
        c = Counter()
        for s in samples:
            mask = [0] + [int(m) for m in s.loss_mask[1:]]
            c[(tuple(s.input_ids), tuple(mask))] += 1
        return c

    assert segments(cache.train) == expected(ref.train)
    assert segments(cache.heldout) == expected(ref.heldout)
    st = cache.stats
    assert st["sources"]["a"]["train_records_weighted"] == ref.stats["sources"]["a"]["train_records_weighted"]
    assert st["totals"]["train"]["samples"] == len(ref.train)
    if packing == "bfd":
        assert st["packing"]["train"]["segments_per_row"] > 1.5


def test_cpt_concat_rows_are_full_and_document_mask_choice(tmp_path, trained_tokenizer):
    write_jsonl(tmp_path / "t.jsonl", texts(40))
    for mask in (True, False):
        r = make_recipe([{"path": str(tmp_path / "t.jsonl")}], task="cpt", max_length=64, packing="concat",
                        document_mask=mask, cache_dir=str(tmp_path / "cache"), num_proc=1)
        c = prepare(r, trained_tokenizer, progress=False)
        lens = c.train.row_lengths()
        assert (lens[:-1] == 64).all()  # every row but the last is full: no padding at all
        total_doc_tokens = c.stats["sources"]["t.jsonl"]["document_tokens"]
        # the statistics round the mean to 2 decimals: exact up to that rounding
        assert abs(c.train.num_tokens - total_doc_tokens["mean"] * total_doc_tokens["count"]) <= 0.005 * total_doc_tokens["count"]
        if mask:
            assert c.train.num_segments > len(c.train)  # a segment per document piece
        else:
            assert c.train.num_segments == len(c.train)  # one segment per row: documents see each other
            # only the first token of each row carries no loss
            assert int(np.asarray(c.train.loss_mask).sum()) == c.train.num_tokens - len(c.train)


def test_statistics_per_source_and_filters(tmp_path, trained_tokenizer):
    recs = chat("a", 10)
    recs += [recs[0], recs[1]]  # two exact duplicates
    recs.append({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})  # too short
    write_jsonl(tmp_path / "a.jsonl", recs)
    r = make_recipe([{"path": str(tmp_path / "a.jsonl"), "name": "a", "licence": "CC-BY-4.0"}], chat_template="chatml",
                    max_length=128, cache_dir=str(tmp_path / "cache"), num_proc=1,
                    filters={"exact_dedup": True, "min_chars": 10, "max_tokens": 1000})
    c = prepare(r, trained_tokenizer, progress=False)
    s = c.stats["sources"]["a"]
    assert s["records_read"] == 13
    assert s["filters"]["too_short_chars"] == {"dropped": 1, "kept_share": round(12 / 13, 6)}
    assert s["filters"]["exact_duplicate"]["dropped"] == 2
    assert s["filters"]["too_long_tokens"]["dropped"] == 0
    assert s["documents_kept"] == 10 and s["licence"] == "CC-BY-4.0"
    dt = s["document_tokens"]
    assert dt["count"] == 10 and dt["min"] <= dt["p50"] <= dt["p90"] <= dt["p99"] <= dt["max"]
    assert s["train"]["loss_tokens"] > 0 and s["train"]["tokens"] == c.train.num_tokens
    assert c.stats["padding_fraction"] == 0.0
    assert 0 < c.stats["packing"]["train"]["row_fill"] <= 1
    assert c.stats["tokenization"]["tokens"] > 0
    # token bounds drop documents instead of truncating them
    r2 = make_recipe([{"path": str(tmp_path / "a.jsonl"), "name": "a"}], chat_template="chatml", max_length=128,
                     cache_dir=str(tmp_path / "cache"), num_proc=1, filters={"max_tokens": dt["min"] - 1})
    s2 = prepare(r2, trained_tokenizer, progress=False).stats["sources"]["a"]
    assert s2["documents_kept"] == 1  # only the two-word conversation is short enough
    assert s2["filters"]["too_long_tokens"] == {"dropped": 12, "kept_share": round(1 / 13, 6)}
    assert json.dumps(c.stats)  # JSON-serialisable for data_stats.json


def test_near_dedup_drops_near_copies(tmp_path, trained_tokenizer):
    pytest.importorskip("datasketch")
    docs = texts(12, words=80)
    near = dict(docs[3])
    near["text"] = near["text"].replace("décision", "décisions", 1)  # one word differs
    write_jsonl(tmp_path / "t.jsonl", docs + [near])
    r = make_recipe([{"path": str(tmp_path / "t.jsonl"), "name": "t"}], task="cpt", max_length=64,
                    cache_dir=str(tmp_path / "cache"), num_proc=1,
                    filters={"exact_dedup": True, "near_dedup": True, "near_dedup_threshold": 0.7})
    s = prepare(r, trained_tokenizer, progress=False).stats["sources"]["t"]
    assert s["filters"]["exact_duplicate"]["dropped"] == 0
    assert s["filters"]["near_duplicate"]["dropped"] >= 1


def test_multiprocess_tokenization_equals_single(tmp_path, trained_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", chat("a", 150))
    outs = []
    for n in (1, 2):
        r = make_recipe([{"path": str(tmp_path / "a.jsonl")}], chat_template="chatml", max_length=128,
                        cache_dir=str(tmp_path / f"cache{n}"), num_proc=n)
        c = prepare(r, trained_tokenizer, progress=False)
        outs.append((np.asarray(c.train.input_ids).copy(), np.asarray(c.train.loss_mask).copy(), c.key))
    assert outs[0][2] == outs[1][2]
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])


def test_cache_root_from_environment(tmp_path, trained_tokenizer, monkeypatch):
    monkeypatch.setenv("AFFINAGE_CACHE", str(tmp_path / "envcache"))
    write_jsonl(tmp_path / "a.jsonl", chat("a", 5))
    r = make_recipe([{"path": str(tmp_path / "a.jsonl")}], chat_template="chatml", max_length=128, num_proc=1)
    c = prepare(r, trained_tokenizer, progress=False)
    assert c.path.parent == (tmp_path / "envcache").resolve()
    assert os.path.isfile(c.path / "train" / "input_ids.npy")
