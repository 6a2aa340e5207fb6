"""Broken model folders (what a failed download or copy leaves) give one error naming folder, file and the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from affinage.model.check import check_model_folder, check_recipe_model
from affinage.model.errors import ModelFolderError
from affinage.model.load import load_model, load_tokenizer


@pytest.fixture
def folder(tiny_folders, tmp_path):
    dst = tmp_path / "org" / "model"
    shutil.copytree(tiny_folders["llama"], dst)
    return dst


def _config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def _refused(folder, make_recipe, file: str, says: str):
    recipe = make_recipe(str(folder), "full")
    with pytest.raises(ModelFolderError) as e:
        load_model(recipe)
    text = str(e.value)
    assert text.startswith(f"model folder {folder}: {file}"), text
    assert says in text
    assert "hf download" in text  # how to stage it again
    return text


def test_healthy_folder_passes(folder):
    cfg = check_model_folder(folder)
    assert cfg["model_type"] == "llama"


def test_config_not_json(folder, make_recipe):
    (folder / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64,,}')
    _refused(folder, make_recipe, "config.json:2", "not valid JSON")


def test_config_without_or_with_unknown_model_type(folder, make_recipe):
    _config(folder, model_type=None)
    _refused(folder, make_recipe, "config.json", "no model_type")
    _config(folder, model_type="lama")
    text = _refused(folder, make_recipe, "config.json", "unknown model_type 'lama'")
    assert "Did you mean 'llama'?" in text


def test_negative_dimension(folder, make_recipe):
    _config(folder, intermediate_size=-128)
    _refused(folder, make_recipe, "config.json", "intermediate_size is -128")


def test_no_weights(folder, make_recipe):
    (folder / "model.safetensors").unlink()
    _refused(folder, make_recipe, "model.safetensors", "no weights file")
    check_model_folder(folder, weights=False)  # model.init: random and plan need only config.json


def test_truncated_and_garbage_safetensors(folder, make_recipe):
    w = folder / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 1000])
    _refused(folder, make_recipe, "model.safetensors", "truncated")
    w.write_bytes(b"\xff" * 4096)
    _refused(folder, make_recipe, "model.safetensors", "not a safetensors file")
    w.write_bytes(data[:8] + b"#" * (len(data) - 8))
    _refused(folder, make_recipe, "model.safetensors", "header is not readable")
    w.write_bytes(b"")
    _refused(folder, make_recipe, "model.safetensors", "too short")


def test_missing_shard(folder, make_recipe):
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    _refused(folder, make_recipe, "model-00001-of-00002.safetensors", "missing (2 of 2 shards missing)")


def test_vocab_smaller_than_tokenizer(folder, make_recipe):
    recipe = make_recipe(str(folder), "full", init="random")
    tokenizer = load_tokenizer(recipe.model)
    _config(folder, vocab_size=len(tokenizer) - 10)
    with pytest.raises(ModelFolderError, match=f"vocab_size {len(tokenizer) - 10:,} is smaller than the tokenizer's"):
        check_recipe_model(recipe, tokenizer)


def test_plan_checks_config(folder, make_recipe):
    from affinage.plan import make_plan

    _config(folder, num_hidden_layers=0)
    with pytest.raises(ModelFolderError, match="num_hidden_layers is 0"):
        make_plan(make_recipe(str(folder), "full"), count_data=False)
