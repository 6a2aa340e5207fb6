"""Merging a trained adapter: fp32 base (also for QLoRA), saved folder reloads with the adapter model's logits."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from affinage.model.errors import MergeParityError, ModelFolderError
from affinage.model.load import load_model, load_tokenizer
import affinage.model.merge as merge_mod
from affinage.model.merge import merge_adapter


def _ids(vocab, seed=0, shape=(2, 16)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _train_and_save(recipe, adapter_dir, steps=3):
    """A few Adam steps so the adapter is far from its zero init, then save it like a run's final/."""
    model = load_model(recipe)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = _ids(model.get_input_embeddings().num_embeddings, seed=1, shape=(4, 24))
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(adapter_dir)
    load_tokenizer(recipe.model).save_pretrained(adapter_dir)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_lora_merge_reloads_with_adapter_logits(tiny_folders, make_recipe, tmp_path):
    recipe = make_recipe(tiny_folders["llama"], "lora", lora={"r": 8})
    adapter = _train_and_save(recipe, tmp_path / "final")
    ids = _ids(adapter.get_input_embeddings().num_embeddings, seed=5)
    expected = _logits(adapter, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_folders["llama"], dtype=torch.float32).eval()
    assert (expected - _logits(base, ids)).abs().max() > 1e-2  # the adapter really changes the model

    old_umask = os.umask(0o022)
    try:
        report = merge_adapter(tmp_path / "final", recipe, tmp_path / "merged")
    finally:
        os.umask(old_umask)
    out = tmp_path / "merged"
    assert out.stat().st_mode & 0o055 == 0o055  # group/others can read it, as with any folder (shared $WORK)
    assert report.dtype == "float32" and report.logit_scale > 0
    assert report.tolerance == pytest.approx(merge_mod.DEFAULT_TOLERANCE["float32"] * max(1.0, report.logit_scale))
    assert report.max_abs_logit_diff < 1e-4 <= report.tolerance
    assert report.base_was_quantized is False and report.check_tokens > 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "merge_report.json").read_text())["max_abs_logit_diff"] == report.max_abs_logit_diff
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (_logits(merged, ids) - expected).abs().max() < 1e-5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_qlora_adapter_merges_into_an_unquantised_base(tiny_folders, make_recipe, tmp_path):
    pytest.importorskip("bitsandbytes")
    recipe = make_recipe(tiny_folders["mistral"], "qlora")
    _train_and_save(recipe, tmp_path / "final")
    report = merge_adapter(tmp_path / "final", recipe, tmp_path / "merged")
    assert report.base_was_quantized is True and report.max_abs_logit_diff < 1e-4
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}


def test_random_init_base_is_rebuilt_from_the_recipe_seed(tiny_folders, make_recipe, tmp_path):
    recipe = make_recipe(tiny_folders["qwen2"], "lora", init="random", seed=3)
    adapter = _train_and_save(recipe, tmp_path / "final")
    ids = _ids(adapter.get_input_embeddings().num_embeddings)
    expected = _logits(adapter, ids)
    report = merge_adapter(tmp_path / "final", recipe, tmp_path / "merged")
    assert report.max_abs_logit_diff < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert (_logits(merged, ids) - expected).abs().max() < 1e-5
    with pytest.raises(ModelFolderError, match="pass the run's Recipe"):
        merge_adapter(tmp_path / "final", recipe.model, tmp_path / "merged2")


def test_parity_failure_raises_and_writes_nothing(tiny_folders, make_recipe, tmp_path, monkeypatch):


    recipe = make_recipe(tiny_folders["llama"], "lora")
    _train_and_save(recipe, tmp_path / "final", steps=1)
    real = merge_mod._logits
    calls = []

    def drifting(model, ids):  # simulates a merge that changed the function (e.g. merged into the wrong weights)
        calls.append(1)
        return real(model, ids) + (0.0 if len(calls) == 1 else 1e-3)

    monkeypatch.setattr(merge_mod, "_logits", drifting)
    with pytest.raises(MergeParityError) as err:
        merge_adapter(tmp_path / "final", str(tiny_folders["llama"]), tmp_path / "merged")
    assert err.value.max_abs_diff == pytest.approx(1e-3, rel=1e-3) and err.value.tolerance < 1e-3
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bf16_merge_uses_a_looser_tolerance_and_replaces_an_old_merge(tiny_folders, make_recipe, tmp_path):
    recipe = make_recipe(tiny_folders["llama"], "lora")
    _train_and_save(recipe, tmp_path / "final", steps=2)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "stale.txt").write_text("old")
    (tmp_path / "merged" / merge_mod.REPORT_FILE).write_text("{}")  # an earlier merge: affinage may replace it
    report = merge_adapter(tmp_path / "final", None, tmp_path / "merged", dtype=torch.bfloat16)  # base from adapter_config
    assert report.dtype == "bfloat16" and report.max_abs_logit_diff < report.tolerance
    assert report.tolerance == merge_mod.DEFAULT_TOLERANCE["bfloat16"] and report.logit_scale > 0
    assert not (tmp_path / "merged" / "stale.txt").exists()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


def test_merge_never_replaces_a_folder_it_did_not_create(tiny_folders, make_recipe, tmp_path):
    from affinage.run import FolderNotOursError

    recipe = make_recipe(tiny_folders["llama"], "lora")
    _train_and_save(recipe, tmp_path / "final", steps=1)
    mine = tmp_path / "my-models"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FolderNotOursError, match="never replaces a folder it did not create"):
        merge_adapter(tmp_path / "final", str(tiny_folders["llama"]), mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
