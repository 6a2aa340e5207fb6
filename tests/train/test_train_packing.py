"""Packing parity and the selective loss: packed rows train exactly like the samples one by one.

Tolerances (float32, CPU): per-token losses of packed vs unpacked samples within 2e-5 (measured
~1e-6); the selective loss equals the model's own loss within 1e-6 relative; after two optimizer
steps on the same samples, packed (padding-free, AffinageTrainer) and unpacked (padded batches,
plain HF Trainer with the model's loss) weights agree within 1e-5. A "wrapped" layout, where
samples see each other, differs by more than 1e-3: the test can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from affinage.data.collator import PackedCollator, PackedDataset
from affinage.data.prepare import prepare
from affinage.recipe.schema import Recipe
from affinage.train.attention import use_varlen_attention
from affinage.train.loss import AffinageTrainer, selective_lm_loss

TOKEN_TOL = 2e-5


def recipe(tiny_llama_dir, demo_data, tmp_path, **data) -> Recipe:
    return Recipe.model_validate({
        "name": "p", "task": "sft", "seed": 3,
        "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
        "method": {"kind": "full"},
        "data": {"sources": [{"path": str(demo_data / "qa_culture.jsonl"), "max_records": 24}], "max_length": 256,
                 "cache_dir": str(tmp_path / "cache"), "num_proc": 1, **data},
        "training": {"global_batch_size": 4, "duration": "2 steps"},
    })


@pytest.fixture
def model_and_cache(tiny_llama_dir, demo_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from affinage.model.load import load_tokenizer_folder

    tok = load_tokenizer_folder(tiny_llama_dir)
    cache = prepare(recipe(tiny_llama_dir, demo_data, tmp_path), tok, progress=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    return model, cache, tok


def segments_of(split):
    """(ids, labels) of every sample in the cache, unpacked."""
    out = []
    for r in range(len(split)):
        row = split[r]
        pos = 0
        for n in row["seq_lens"]:
            ids = row["input_ids"][pos : pos + n].astype(np.int64)
            lab = np.where(row["loss_mask"][pos : pos + n] > 0, ids, -100)
            out.append((ids, lab))
            pos += n
    return out


def token_losses(model, batch) -> torch.Tensor:
    """Per-target-token losses of a batch (shifted), in order, for labels != -100."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    return lp[labels.reshape(-1) != -100]


def unpacked_losses(model, samples) -> torch.Tensor:
    out = []
    for ids, lab in samples:
        b = {"input_ids": torch.tensor(ids)[None], "labels": torch.tensor(lab)[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        out.append(token_losses(model, b))
    return torch.cat(out)


def test_packed_rows_give_the_per_token_losses_of_the_samples_alone(model_and_cache):
    model, cache, tok = model_and_cache
    split = cache.train
    rows = [split[r] for r in range(len(split))]
    assert max(len(r["seq_lens"]) for r in rows) >= 2  # rows really hold several samples
    ref = unpacked_losses(model, segments_of(split))

    # 1. padding-free batch, transformers' own path (block-diagonal mask from restarting position_ids)
    flat = PackedCollator(tok.pad_token_id)(rows)
    sdpa = token_losses(model, flat)
    # 2. padded rows, no attention_mask (block-diagonal per row)
    padded = token_losses(model, PackedCollator(tok.pad_token_id, flatten=False)(rows))
    # 3. padding-free with affinage's per-segment causal attention (CPU varlen)
    assert use_varlen_attention(model) == "affinage_varlen"
    varlen = token_losses(model, flat)
    for got in (sdpa, padded, varlen):
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) < TOKEN_TOL

    # a "wrapped" layout (positions run on across samples, plain causal attention): samples see each other
    model.set_attn_implementation("sdpa")
    leak = dict(flat)
    leak["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
    for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        leak.pop(k)
    leaked = token_losses(model, leak)
    assert float((leaked - ref).abs().max()) > 1e-3


def test_selective_loss_equals_the_models_own_loss(model_and_cache):
    model, cache, tok = model_and_cache
    rows = [cache.train[r] for r in range(min(3, len(cache.train)))]
    batch = PackedCollator(tok.pad_token_id, flatten=False)(rows)
    own = model(**batch).loss
    mine, _ = selective_lm_loss(model, batch)
    assert torch.allclose(mine, own, rtol=1e-6, atol=1e-7), (float(mine), float(own))
    # and with an explicit normaliser (gradient accumulation): sum / num_items
    n = int((batch["labels"][:, 1:] != -100).sum())
    mine_sum, _ = selective_lm_loss(model, batch, num_items_in_batch=torch.tensor(2 * n))
    assert torch.allclose(mine_sum * 2, own, rtol=1e-6)
    # the head really ran on loss-bearing positions only
    flat = PackedCollator(tok.pad_token_id)(rows)
    _, out = selective_lm_loss(model, flat)
    assert out.logits.shape[1] == n < flat["input_ids"].numel()


def test_packed_and_unpacked_training_reach_the_same_weights(model_and_cache, tmp_path):
    """Two optimizer steps over the same samples: AffinageTrainer on packed rows vs HF Trainer on padded samples."""
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, cache, tok = model_and_cache
    split = cache.train
    samples = [{"input_ids": ids.tolist(), "labels": lab.tolist()} for ids, lab in segments_of(split)]
    folder = model.name_or_path

    def args(out, bs, ga):
        return TrainingArguments(output_dir=str(out), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                                 max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", optim="sgd",
                                 use_cpu=True, report_to="none", remove_unused_columns=False, logging_steps=1,
                                 save_strategy="no", seed=0, data_seed=0, dataloader_drop_last=False)

    def fresh():
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        m.config.use_cache = False
        return m

    # unpacked: every sample in each step (padded micro-batches of up to 4 samples)
    n = len(samples)
    bs = max(d for d in (1, 2, 3, 4) if n % d == 0)
    ref_model = fresh()
    t_ref = Trainer(model=ref_model, args=args(tmp_path / "u", bs, n // bs), train_dataset=samples,
                    data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    t_ref.train()

    # packed: every row in each step (1 row per micro-batch, padding-free, varlen attention)
    packed_model = fresh()
    use_varlen_attention(packed_model)
    t_pk = AffinageTrainer(model=packed_model, args=args(tmp_path / "p", 1, len(split)), train_dataset=PackedDataset(split),
                           data_collator=PackedCollator(tok.pad_token_id))
    t_pk.train()

    la = [h["loss"] for h in t_ref.state.log_history if "loss" in h]
    lb = [h["loss"] for h in t_pk.state.log_history if "loss" in h]
    assert len(la) == len(lb) == 2
    assert np.allclose(la, lb, rtol=1e-5), (la, lb)
    for (name, a), (_, b) in zip(ref_model.named_parameters(), packed_model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
