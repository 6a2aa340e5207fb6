"""Perplexity, bits per byte and multiple-choice scores checked against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from affinage.data.errors import DataError
from affinage.eval import mcq, perplexity
from affinage.eval.sets import McqItem, read_mcq
from affinage.model.load import load_tokenizer_folder
from affinage.model.tiny import train_tokenizer
from eval_helpers import LAW_ITEMS, ConstantModel, legal_file, texts, write_jsonl, one_torch_thread  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    return model, load_tokenizer_folder(tiny_llama_dir)


def plain_nll(model, ids: list[int]) -> float:
    """Summed NLL of ids[1:] given the previous ids: one forward pass, no windows, no batching."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))


# ------------------------------------------------------------------------------- perplexity
def test_windows_score_every_token_once_within_the_length():
    for n, length, stride in [(10, 4, 2), (10, 4, None), (3, 8, None), (100, 16, 15), (17, 16, 1)]:
        seen = []
        for s, a, e in perplexity.windows(n, length, stride):
            assert e - s <= length and s < a <= e
            seen += range(a, e)
        assert seen == list(range(1, n))


def test_perplexity_and_bits_per_byte_equal_a_plain_forward_pass(tiny):
    model, tok = tiny
    docs = [t for t in texts(legal_file(), n=12, max_chars=1500)][:6]
    scores = perplexity.score_texts(model, tok, docs, max_length=2048, batch_size=4)
    total_nll = total_bytes = total_tokens = 0
    for text, sc in zip(docs, scores):
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        expected = plain_nll(model, ids)
        assert sc.nll == pytest.approx(expected, rel=1e-5)
        assert sc.tokens == len(ids) - 1 and sc.bytes == len(text.encode("utf-8"))
        total_nll, total_bytes, total_tokens = total_nll + expected, total_bytes + len(text.encode()), total_tokens + len(ids) - 1
    agg = perplexity.aggregate(scores)
    assert agg["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / total_bytes, rel=1e-5)
    assert agg["token_perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)


def test_long_text_is_scored_in_sliding_windows(tiny):
    model, tok = tiny
    text = " ".join(texts(legal_file(), n=4))
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 200
    sc = perplexity.score_texts(model, tok, [text, "Court."], max_length=64, stride=32, batch_size=3)[0]
    assert sc.tokens == len(ids) - 1
    expected = 0.0  # each window alone, unbatched: the tokens [a, e) given ids [s, a)
    for s, a, e in perplexity.windows(len(ids), 64, 32):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids[s:e]])).logits[0].float(), -1)
        expected -= sum(float(lp[k - s - 1, ids[k]]) for k in range(a, e))
    assert sc.nll == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------- MCQ
def test_mcq_hand_checked_case_raw_and_length_normalised():
    """A model that always predicts softmax(w), with w['a'] = 3, w['b'] = 1, 0 elsewhere (260 byte tokens).

    log p(a) = 3 - Z, log p(b) = 1 - Z, log p(other) = -Z with Z = log(e^3 + e + 258) = 5.6376.
    Continuations are " " + choice (the space is one byte token, log p = -Z):
      item 1, choices "b" | "aaaa", right answer "aaaa":
        ll(" b") = -2Z + 1 = -10.275      ll(" aaaa") = -5Z + 12 = -16.188  → acc picks "b"    (wrong)
        per character: -10.275 / 1       vs -16.188 / 4 = -4.047            → acc_norm "aaaa" (right)
      item 2, choices "a" | "bb", right answer "a":
        ll(" a") = -2Z + 3 = -8.275       ll(" bb") = -3Z + 2 = -14.913     → acc picks "a"    (right)
        per character: -8.275 / 1        vs -14.913 / 2 = -7.456            → acc_norm "bb"   (wrong)
    """
    tok = train_tokenizer(["ab"], vocab_size=260, min_frequency=1)
    w = torch.zeros(len(tok))
    w[tok.convert_tokens_to_ids("a")] = 3.0
    w[tok.convert_tokens_to_ids("b")] = 1.0
    Z = math.log(math.exp(3) + math.exp(1) + (len(tok) - 2))
    assert Z == pytest.approx(5.6376, abs=1e-4)
    items = [McqItem("Q1", ("b", "aaaa"), 1, "t:1"), McqItem("Q2", ("a", "bb"), 0, "t:2")]
    rows = mcq.score_items(ConstantModel(w), tok, items, template="Question : {question}\nRéponse :")
    assert rows[0]["loglikelihoods"] == pytest.approx([-2 * Z + 1, -5 * Z + 12], abs=1e-4)
    assert rows[1]["loglikelihoods"] == pytest.approx([-2 * Z + 3, -3 * Z + 2], abs=1e-4)
    assert [r["acc"] for r in rows] == [0.0, 1.0]
    assert [r["acc_norm"] for r in rows] == [1.0, 0.0]
    assert mcq.aggregate(rows) == {"items": 2, "acc": 0.5, "acc_norm": 0.5, "acc_norm_bytes": 0.5}


def test_mcq_loglikelihoods_equal_a_direct_forward_pass(tiny, tmp_path):
    model, tok = tiny
    items = read_mcq(str(write_jsonl(tmp_path / "law.jsonl", LAW_ITEMS)))
    template = "Question : {question}\nRéponse :"
    rows = mcq.score_items(model, tok, items, template=template, batch_size=3)
    for item, row in zip(items, rows):
        context = template.format(question=item.question)
        ctx_ids = [tok.bos_token_id] + tok(context, add_special_tokens=False)["input_ids"]
        for choice, ll in zip(item.choices, row["loglikelihoods"]):
            ids = [tok.bos_token_id] + tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            assert ids[: len(ctx_ids)] == ctx_ids
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            direct = sum(float(lp[k - 1, ids[k]]) for k in range(len(ctx_ids), len(ids)))
            assert ll == pytest.approx(direct, abs=1e-4)
        lls = row["loglikelihoods"]
        assert row["acc"] == float(max(range(len(lls)), key=lambda i: (lls[i], -i)) == item.answer)


def test_fewshot_examples_are_solved_other_items_and_seeded():
    items = [McqItem(f"q{i}", ("x", "y"), i % 2, f"f:{i}") for i in range(6)]
    p1 = mcq.fewshot_prefix(2, items, 3, "Q: {question}\nA:", seed=7, set_name="s")
    assert p1 == mcq.fewshot_prefix(2, items, 3, "Q: {question}\nA:", seed=7, set_name="s")
    assert "Q: q2\n" not in p1 and p1.count("\n\n") == 3
    for block in p1.strip().split("\n\n"):
        q = block.split("\n")[0].removeprefix("Q: ")
        answer = items[int(q[1:])].choices[items[int(q[1:])].answer]
        assert block.endswith("A: " + answer)
    with pytest.raises(ValueError, match="at least 6"):
        mcq.fewshot_prefix(0, items, 6, "{question}")


def test_bad_mcq_item_names_its_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [LAW_ITEMS[0], {"question": "Q", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: 'answer' must be the index \(0 to 1\)"):
        read_mcq(str(path))


# --------------------------------------------------------------------------- packed scoring
def test_packed_scoring_equals_the_per_document_path(tiny, tmp_path):
    """Packed rows (varlen attention, one forward per row) give every document the NLL it gets alone,
    long documents included (windowed exactly as unpacked); MCQ log-likelihoods likewise."""
    model, tok = tiny
    docs = texts(legal_file(), n=10, max_chars=150)
    docs.append(" ".join(texts(legal_file(), n=4)))  # longer than max_length: sliding windows
    assert len(tok(docs[-1], add_special_tokens=False)["input_ids"]) > 3 * 128
    meter: dict = {}
    packed = perplexity.score_texts(model, tok, docs, max_length=128, stride=64, meter=meter)
    alone = perplexity.score_texts(model, tok, docs, max_length=128, stride=64, packed=False, batch_size=1)
    for p, a in zip(packed, alone):
        assert p.tokens == a.tokens and p.tokens > 0
        assert p.nll == pytest.approx(a.nll, rel=1e-4)
    # fewer forwards than windows: the rows really are packed, and the meter counts what was read
    n_windows = sum(len(perplexity.windows(1 + len(tok(d, add_special_tokens=False)["input_ids"]), 128, 64)) for d in docs)
    assert meter["forwards"] < n_windows and meter["scored"] == sum(p.tokens for p in packed)
    assert meter["tokens"] >= meter["scored"] and meter["seconds"] > 0
    assert model.config._attn_implementation == "sdpa"  # varlen attention is switched back afterwards

    items = read_mcq(str(write_jsonl(tmp_path / "law.jsonl", LAW_ITEMS)))
    template = "Question : {question}\nRéponse :"
    rows_p = mcq.score_items(model, tok, items, template=template, max_length=128)
    rows_a = mcq.score_items(model, tok, items, template=template, max_length=128, packed=False, batch_size=1)
    for rp, ra in zip(rows_p, rows_a):
        assert rp["loglikelihoods"] == pytest.approx(ra["loglikelihoods"], rel=1e-4)
        assert rp["prediction"] == ra["prediction"]
