"""`affinage plan`: optimizer steps from packed rows (what the Trainer steps over), FLOPs, throughput and MFU.

Numbers checked: a prepared cache of the demo SFT data packs 40 conversations into fewer rows, and
plan's steps equal ceil(epochs × rows / global batch), the count ``train.trainer.steps_for_duration``
uses; before preparing, the estimate is within a factor 2 of it. FLOPs: 6N (full) / 4N (LoRA) per token plus
attention, checked on hand-computed values.
"""

from __future__ import annotations

import math

import pytest

from affinage.plan import PEAK_BF16_FLOPS, make_plan, mfu, throughput, training_flops_per_token
from affinage.recipe.schema import Recipe


def recipe(tiny_llama_dir, demo_data, tmp_path, method="full") -> Recipe:
    return Recipe.model_validate({
        "name": "plan-rows", "task": "sft", "seed": 0,
        "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
        "method": {"kind": method},
        "data": {"sources": [{"path": str(demo_data / "qa_culture.jsonl"), "max_records": 40}], "max_length": 512,
                 "cache_dir": str(tmp_path / "cache"), "num_proc": 1, "packing": "bfd"},
        "training": {"global_batch_size": 2, "duration": "2 epochs"},
    })


def test_plan_counts_steps_from_packed_rows(tiny_llama_dir, demo_data, tmp_path):
    from affinage.data.prepare import prepare

    r = recipe(tiny_llama_dir, demo_data, tmp_path)
    estimated = make_plan(r)
    cache = prepare(r, progress=False)
    rows = len(cache.train)
    assert rows < 40  # packing really merged samples
    exact = make_plan(r)
    assert exact.steps == math.ceil(2 * rows / 2) and "prepared cache" in exact.steps_note
    assert exact.steps / 2 <= estimated.steps <= exact.steps * 2 and "≈ packed rows" in estimated.steps_note
    assert estimated.steps < math.ceil(2 * 40 / 2)  # not the record count any more


def test_flops_mfu_and_throughput():
    f_full = training_flops_per_token(linear_params=1_000_000, layers=2, hidden=64, seq_len=100, lora=False)
    f_lora = training_flops_per_token(linear_params=1_000_000, layers=2, hidden=64, seq_len=100, lora=True)
    assert f_full == 6_000_000 + 6 * 2 * 64 * 100 and f_lora == 4_000_000 + 6 * 2 * 64 * 100
    assert mfu(1000.0, 1e12, "h100") == pytest.approx(1e15 / 989e12)
    tp = throughput(1e9, "h200", world_size=2)
    assert tp["tokens_per_s_at_peak"] == pytest.approx(2 * PEAK_BF16_FLOPS["h200"] / 1e9)
    assert tp["tokens_per_s"] == pytest.approx(tp["assumed_mfu"] * tp["tokens_per_s_at_peak"])
    assert throughput(1e9, None) is None


def test_plan_memory_counts_one_chunk_of_logits_with_the_chunked_head(tiny_llama_dir, demo_data, tmp_path):
    """Plain head: micro_batch × seq × vocab fp32 logits and their gradient; chunked: one chunk of rows."""
    plain = recipe(tiny_llama_dir, demo_data, tmp_path)
    chunked = plain.model_copy(deep=True)
    chunked.training.loss.kind, chunked.training.loss.chunk_tokens = "chunked", 128
    m_plain, m_chunked = make_plan(plain).memory, make_plan(chunked).memory
    vocab = 1024  # the tiny Llama's
    assert m_plain.logits == 1 * 512 * vocab * 4 * 2  # micro_batch 1 × max_length 512
    assert m_chunked.logits == 128 * vocab * 4 * 2
    assert m_plain.total - m_chunked.total == m_plain.logits - m_chunked.logits


def test_plan_says_what_training_kernels_resolve_to(tiny_llama_dir, demo_data, tmp_path):
    from affinage.plan import format_plan

    r = recipe(tiny_llama_dir, demo_data, tmp_path)
    here, h100 = make_plan(r, count_data=False), make_plan(r, count_data=False, gpu="h100")
    import torch

    if not torch.cuda.is_available():
        assert "on this machine (no CUDA): liger off (needs CUDA" in here.kernels and "torch.compile off" in here.kernels
    assert h100.kernels.startswith("on a CUDA machine with liger-kernel: liger on") and "not measured on GPU" in h100.kernels
    assert f"kernels         {h100.kernels}" in format_plan(h100) and here.as_dict()["kernels"] == here.kernels
    r.training.kernels.liger = "on"
    if not torch.cuda.is_available():
        assert "liger would fail: training.kernels.liger on: needs CUDA" in make_plan(r, count_data=False).kernels
