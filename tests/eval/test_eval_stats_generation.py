"""Bootstrap intervals and greedy generation."""

from __future__ import annotations

import math

import pytest
import torch

from affinage.eval.generation import generate
from affinage.eval.stats import mean_ci, paired_mean_delta, paired_ratio_delta, ratio_ci
from affinage.model.load import load_tokenizer_folder
from eval_helpers import one_torch_thread  # noqa: F401 (autouse)


def test_paired_delta_no_change_and_real_change():
    a = [0, 1, 1, 0, 1, 0, 1, 1, 0, 1] * 3
    same = paired_mean_delta(a, a, iterations=500)
    assert same["delta"] == 0 and same["ci_low"] == same["ci_high"] == 0 and not same["excludes_zero"]
    better = paired_mean_delta([0] * 30, [1] * 25 + [0] * 5, iterations=500)
    assert better["delta"] == pytest.approx(25 / 30) and better["excludes_zero"] and better["ci_low"] > 0.6
    noisy = paired_mean_delta([0, 1] * 5, [1, 0] * 5, iterations=500)
    assert noisy["delta"] == 0 and not noisy["excludes_zero"]
    assert paired_mean_delta(a, a[::-1], seed=3) == paired_mean_delta(a, a[::-1], seed=3)  # seeded


def test_ratio_delta_is_the_change_of_bits_per_byte():
    nll_a, nll_b, nbytes = [10.0, 20.0, 30.0, 40.0], [8.0, 15.0, 27.0, 30.0], [5.0, 10.0, 15.0, 20.0]
    d = paired_ratio_delta(nll_a, nll_b, nbytes, scale=1 / math.log(2), iterations=400)
    bpb_a, bpb_b = 100 / 50 / math.log(2), 80 / 50 / math.log(2)
    assert d["delta"] == pytest.approx(bpb_b - bpb_a)
    assert d["relative"]["delta"] == pytest.approx(-0.2)
    assert d["ci_high"] < 0 and d["excludes_zero"]
    one = ratio_ci(nll_a, nbytes, scale=1 / math.log(2), iterations=400)
    assert one["value"] == pytest.approx(bpb_a) and one["ci_low"] <= bpb_a <= one["ci_high"]
    m = mean_ci([1, 0, 1, 1], iterations=300)
    assert m["value"] == 0.75 and 0 <= m["ci_low"] <= 0.75 <= m["ci_high"] <= 1


def test_greedy_generation_is_the_argmax_continuation(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    tok = load_tokenizer_folder(tiny_llama_dir)
    prompt = "La Constitution de 1958"
    out = generate(model, tok, [prompt, prompt], max_new_tokens=6)
    assert out[0] == out[1]
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    assert out[0] == tok.decode(new, skip_special_tokens=True)


def test_grouped_bootstrap_matches_the_hand_computed_distribution():
    """Two books of two passages, A = [1, 1] and B = [0, 0]: resampling books gives the mean 0, ½ or 1
    with probabilities ¼, ½, ¼, so the 40 % interval (quantiles 0.3 and 0.7) is [½, ½]. Resampling the
    four passages as if independent gives 0, ¼, ½, ¾, 1 with 1, 4, 6, 4, 1 sixteenths: [¼, ¾]."""
    values, books = [1, 1, 0, 0], ["A", "A", "B", "B"]
    grouped = mean_ci(values, groups=books, iterations=20000, confidence=0.4, seed=0)
    assert (grouped["ci_low"], grouped["ci_high"]) == (0.5, 0.5)
    assert grouped["n"] == 4 and grouped["n_groups"] == 2 and grouped["too_few"]
    flat = mean_ci(values, iterations=20000, confidence=0.4, seed=0)
    assert (flat["ci_low"], flat["ci_high"]) == (0.25, 0.75) and "n_groups" not in flat


def test_grouped_ratio_and_paired_deltas_resample_whole_groups():
    from affinage.eval.stats import group_sums

    (num, den), g = group_sums(["b", "a", "b"], [1.0, 2.0, 3.0], [10.0, 20.0, 30.0])
    assert g == 2 and list(num) == [2.0, 4.0] and list(den) == [20.0, 40.0]  # groups sorted by label
    # one unit per group is the ungrouped bootstrap, draw for draw
    nll_a, nll_b, nbytes = [5.0, 6.0, 7.0, 8.0] * 5, [4.0, 6.5, 6.0, 7.0] * 5, [10.0, 12.0, 11.0, 9.0] * 5
    alone = paired_ratio_delta(nll_a, nll_b, nbytes, iterations=300, seed=2)
    singletons = paired_ratio_delta(nll_a, nll_b, nbytes, groups=[f"{i:02d}" for i in range(20)], iterations=300, seed=2)
    assert alone["ci_low"] == singletons["ci_low"] and alone["ci_high"] == singletons["ci_high"]
    # 20 passages from 2 books: the interval widens and the verdict is "too few"
    books = ["x"] * 10 + ["y"] * 10
    d = paired_mean_delta([0.0] * 20, [1.0] * 8 + [0.0] * 2 + [0.0] * 10, groups=books, iterations=2000, seed=1)
    flat = paired_mean_delta([0.0] * 20, [1.0] * 8 + [0.0] * 2 + [0.0] * 10, iterations=2000, seed=1)
    assert d["n_groups"] == 2 and d["too_few"] and not flat["too_few"]
    assert d["ci_high"] - d["ci_low"] > flat["ci_high"] - flat["ci_low"]
