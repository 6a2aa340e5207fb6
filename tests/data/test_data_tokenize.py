"""Batched tokenization (``data.tokenize``): the same ids and loss masks as the one-sample functions.

The reference for a conversation is ``templates.tokenize_chat`` (HF wrapper, one record at a time);
for a document, ``tokenizer(text)`` with BOS and EOS around it.
"""

from __future__ import annotations

import bisect
import json
import random
import warnings

import numpy as np
import pytest

from affinage.data.formats import to_canonical
from affinage.data.templates import NAMED_TEMPLATES, mask_array_from_spans, tokenize_chat
from affinage.data.tokenize import cut_document, document_ids, fast_backend, tokenize_chunk
from data_helpers import REAL_TOKENIZERS, SHARED, needs_shared, real_tokenizer

TEXT = "Le tribunal a rendu sa décision après une longue délibération. " * 6
CONV = [
    {"role": "system", "content": "Réponds en français, brièvement."},
    {"role": "user", "content": "Où se trouve la préfecture ?"},
    {"role": "assistant", "content": "Elle est près de la gare, à côté du théâtre."},
    {"role": "user", "content": "Et l'hôpital ?"},
    {"role": "assistant", "content": "L'hôpital est en face de la bibliothèque."},
]


def test_document_ids_are_bos_tokens_eos(trained_tokenizer):
    docs = document_ids(trained_tokenizer, [TEXT, "Rennes."], fast_backend(trained_tokenizer))
    for text, ids in zip([TEXT, "Rennes."], docs):
        ref = trained_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids.dtype == np.uint32
        assert ids.tolist() == [trained_tokenizer.bos_token_id] + ref + [trained_tokenizer.eos_token_id]
    assert [d.tolist() for d in document_ids(trained_tokenizer, [TEXT, "Rennes."])] == [d.tolist() for d in docs]  # HF wrapper path
    trained_tokenizer.bos_token = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (ids,) = document_ids(trained_tokenizer, ["Rennes est une ville."], fast_backend(trained_tokenizer))
    assert ids[0] != trained_tokenizer.convert_tokens_to_ids("<s>") and ids[-1] == trained_tokenizer.eos_token_id


def test_a_document_is_cut_in_one_place(trained_tokenizer):
    (ids,) = document_ids(trained_tokenizer, [TEXT])
    pieces = cut_document(ids, 16, "bfd")
    assert np.concatenate([p for p, _ in pieces]).tolist() == ids.tolist()[: sum(len(p) for p, _ in pieces)]
    assert all(len(p) <= 16 and m.all() and len(m) == len(p) for p, m in pieces)
    kept = len(ids) if len(ids) % 16 != 1 else len(ids) - 1  # a final piece of one token predicts nothing
    assert sum(len(p) for p, _ in pieces) == kept and len(pieces) == -(-kept // 16)
    assert cut_document(np.arange(33, dtype=np.uint32), 16, "none")[-1][0].tolist() == [16 + k for k in range(16)]
    (whole, mask), = cut_document(ids, 16, "concat")  # concat: rows are cut by the layout, not here
    assert whole.tolist() == ids.tolist() and mask.all()
    assert cut_document(np.array([7], np.uint32), 16, "bfd") == []


def per_token_rule(offsets, ids, spans, special_ids) -> list[bool]:
    """The mask rule written token by token (templates' loop before it was vectorised): the oracle."""
    out = []
    for (s, e), t in zip(offsets, ids):
        j = bisect.bisect_right([a for a, _ in spans], s) - 1
        if e <= s:
            out.append(j >= 0 and s < spans[j][1])
            continue
        hit = spans[j] if j >= 0 and s < spans[j][1] else spans[j + 1] if j + 1 < len(spans) and spans[j + 1][0] < e else None
        out.append(hit is not None and (t not in special_ids or (hit[0] <= s and e <= hit[1])))
    return out


def test_vectorised_mask_is_the_per_token_rule():
    rng = random.Random(0)
    for _ in range(400):
        cuts = sorted(rng.sample(range(1, 200), rng.randint(1, 60)))
        offsets = [(a, b) for a, b in zip([0] + cuts, cuts + [200])]
        offsets = [(a, a) if rng.random() < 0.05 else (a, b) for a, b in offsets]  # zero-width special tokens
        ids = [rng.randrange(20) for _ in offsets]
        special = set(rng.sample(range(20), rng.randint(0, 5)))
        edges = sorted(rng.sample(range(0, 201), 2 * rng.randint(1, 4)))
        spans = list(zip(edges[::2], edges[1::2]))
        got = mask_array_from_spans(np.array(offsets, dtype=np.int64), np.array(ids), spans, special)
        assert got.dtype == bool and got.tolist() == per_token_rule(offsets, ids, spans, special)
    assert mask_array_from_spans(np.zeros((0, 2), np.int64), np.zeros(0, np.int64), [(0, 3)], set()).tolist() == []


def check_chat_chunk(tok, conversations, max_length):
    chunk = [(i, f"c[{i}]", {"messages": m}) for i, m in enumerate(conversations)]
    results = tokenize_chunk(tok, fast_backend(tok), "sft", max_length, "bfd", chunk)
    assert [r[0] for r in results] == list(range(len(conversations)))
    for (idx, err, res), messages in zip(results, conversations):
        assert err is None
        ref = tokenize_chat(tok, messages, max_length)
        ((ids, mask),) = res.pieces
        assert ids.tolist() == ref.input_ids and mask.tolist() == ref.loss_mask
        assert res.truncated == ref.truncated and res.full_length == len(tokenize_chat(tok, messages, 1 << 30))
    return results


def test_chat_chunk_equals_tokenize_chat_and_reports_bad_records(trained_tokenizer):
    trained_tokenizer.chat_template = NAMED_TEMPLATES["chatml"]
    convs = [CONV, CONV[1:3], CONV[3:]]
    check_chat_chunk(trained_tokenizer, convs, 2048)
    res = check_chat_chunk(trained_tokenizer, convs, 24)
    assert res[0][2].truncated and len(res[0][2].pieces[0][0]) == 24
    trained_tokenizer.chat_template = NAMED_TEMPLATES["mistral"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    out = tokenize_chunk(trained_tokenizer, fast_backend(trained_tokenizer), "sft", 64, "bfd",
                         [(0, "m:1", {"messages": CONV[1:3]}), (1, "m:2", {"messages": bad})])
    assert out[0][1] is None and out[1][2] is None
    msg, where, reason = out[1][1]
    assert msg.startswith("m:2: chat template 'mistral' failed") and where == "m:2" and reason == "chat template error"


def test_backend_without_truncation_or_padding(trained_tokenizer):
    trained_tokenizer.backend_tokenizer.enable_truncation(8)
    backend = fast_backend(trained_tokenizer)
    assert backend.truncation is None and trained_tokenizer.backend_tokenizer.truncation is not None
    (ids,) = document_ids(trained_tokenizer, [TEXT], backend)
    assert len(ids) > 10


@pytest.mark.shared
@needs_shared
@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_real_tokenizers_piaf_and_legal_text(name):
    tok = real_tokenizer(name)
    lines = (SHARED / "data" / "fr_instruct_piaf_qa.jsonl").read_text(encoding="utf-8").splitlines()
    convs = [to_canonical(json.loads(line), "chat", where=f"piaf[{i}]")["messages"]
             for i, line in enumerate(random.Random(1).sample(lines, 40))]
    check_chat_chunk(tok, convs, 4096)
    check_chat_chunk(tok, convs, 96)  # truncated inside the paragraph or the reply
    texts = []
    with open(SHARED / "data" / "fr_legal_codes.jsonl", encoding="utf-8") as f:
        for line, _ in zip(f, range(20)):
            texts.append(json.loads(line)["text"])
    for text, ids in zip(texts, document_ids(tok, texts, fast_backend(tok))):
        ref = tok(text, add_special_tokens=False)["input_ids"]
        special = [t for t in (tok.bos_token_id, tok.eos_token_id) if t is not None]
        assert len(ids) == len(ref) + len(special) and ids[len(ids) - len(ref) - (tok.eos_token_id is not None):][: len(ref)].tolist() == ref
