"""`affinage recipes list/copy`: every shipped recipe listed, a copy that runs from its new folder."""

from __future__ import annotations

import os

import pytest

from affinage.cli import main
from affinage.recipe.loader import dump_resolved, load_recipe, load_recipe_with_sources
from affinage.recipes_catalog import CatalogError, catalog, copy_recipe, find_recipe, needed_files, prerequisite, recipes_root

SHIPPED = {
    "demo/full/cpt": ("cpt", "full"), "demo/full/base-general": ("cpt", "full"), "demo/full/adapt-droit": ("cpt", "full"),
    "demo/lora/sft-qa": ("sft", "lora"), "demo/dpo/dpo-register": ("dpo", "lora"), "lucie-7b/lora/sft-piaf": ("sft", "lora"),
    "mistral-7b/qlora/cpt-legal": ("cpt", "qlora"), "qwen2.5-7b/lora/sft-piaf": ("sft", "lora"),
    "smollm2-135m/lora/cpt-legal": ("cpt", "lora"), "smollm2-135m/lora/sft-chat": ("sft", "lora"),
}


def test_catalog_lists_every_shipped_recipe_and_nothing_else():
    entries = {e.key: e for e in catalog()}
    assert set(entries) == set(SHIPPED)  # not _base/lora-7b, not demo/eval/lm_eval/*.yaml (an lm-eval task)
    for key, (task, method) in SHIPPED.items():
        e = entries[key]
        assert e.error is None, e.error
        assert (e.task, e.method) == (task, method) and e.description
    assert entries["demo/full/cpt"].model == "demo/model (random init)"  # shown inside the tree, not as a full path
    assert entries["lucie-7b/lora/sft-piaf"].model == "OpenLLM-France/Lucie-7B-Instruct"


def test_find_recipe_by_key_file_name_or_recipe_name():
    path = recipes_root() / "demo" / "full" / "cpt.yaml"
    assert find_recipe("demo/full/cpt") == find_recipe("demo/full/cpt.yaml") == find_recipe("demo-cpt") == path
    with pytest.raises(CatalogError, match=r"no shipped recipe 'demo/cpt'. Valid choices: demo/dpo/dpo-register, demo/full/adapt-droit, .*demo/full/cpt"):
        find_recipe("demo/cpt")


def _tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_copy_takes_what_the_recipe_names_and_resolves_the_same_from_dest(tmp_path):
    copied = copy_recipe("demo/full/adapt-droit", tmp_path / "mine")
    assert _tree(tmp_path / "mine") == [
        "demo/data/LICENCE.md", "demo/data/culture_generale.jsonl", "demo/data/droit.jsonl",
        "demo/eval/README.md", "demo/eval/culture_qcm.jsonl", "demo/eval/droit_heldout.jsonl", "demo/eval/droit_qcm.jsonl",
        "demo/eval/general_heldout.jsonl", "demo/eval/lm_eval/demo_droit_qcm.yaml", "demo/eval/prompts.txt",
        "demo/full/adapt-droit.yaml",
    ]
    assert copied.recipe == tmp_path / "mine" / "demo" / "full" / "adapt-droit.yaml"
    original = dump_resolved(load_recipe(find_recipe("demo/full/adapt-droit")))
    copy = dump_resolved(load_recipe(copied.recipe))
    assert str(recipes_root()) not in copy  # every path of the copy points into DEST
    assert copy.replace(str(tmp_path / "mine"), str(recipes_root())) == original
    # the model config folder of a random-init demo comes whole; the source files are byte-identical
    cpt = copy_recipe("demo-cpt", tmp_path / "cpt")
    assert {"demo/model/config.json", "demo/model/tokenizer.json", "demo/model/tokenizer_config.json",
            "demo/model/chat_template.jinja"} <= set(_tree(tmp_path / "cpt"))
    for f in cpt.files:
        assert f.read_bytes() == (recipes_root() / f.relative_to(tmp_path / "cpt")).read_bytes()
    assert all(os.path.exists(s.path) for s in load_recipe(cpt.recipe).data.sources)


def test_copy_keeps_the_base_chain_and_leaves_variables_for_the_cluster(tmp_path):
    copied = copy_recipe("lucie-7b/lora/sft-piaf", tmp_path)
    assert _tree(tmp_path) == ["_base/lora-7b.yaml", "lucie-7b/lora/sft-piaf.yaml"]
    loaded = load_recipe_with_sources(copied.recipe)
    assert loaded.files == [copied.recipe, tmp_path / "_base" / "lora-7b.yaml"]
    assert loaded.recipe.data.sources[0].path == "$WORK/data/fr_instruct_piaf_qa.jsonl"
    assert loaded.recipe.training.gradient_checkpointing is True  # from the base


def test_copy_never_overwrites(tmp_path):
    mine = tmp_path / "demo" / "data" / "droit.jsonl"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own corpus\n")
    with pytest.raises(CatalogError, match=r"1 file\(s\) already exist \(.*droit.jsonl\); nothing was copied"):
        copy_recipe("demo/full/cpt", tmp_path)
    assert _tree(tmp_path) == ["demo/data/droit.jsonl"] and mine.read_text() == "my own corpus\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CatalogError, match="is a file: DEST must be a folder"):
        copy_recipe("demo/full/cpt", tmp_path / "file")


def test_needed_files_and_prerequisites():
    root = recipes_root()
    files = [p.relative_to(root).as_posix() for p in needed_files(find_recipe("demo/lora/sft-qa"))]
    assert files == ["demo/data/LICENCE.md", "demo/data/qa_alpaca.jsonl", "demo/data/qa_culture.jsonl", "demo/lora/sft-qa.yaml"]
    assert prerequisite(find_recipe("demo/lora/sft-qa")).key == "demo/full/cpt"
    assert prerequisite(find_recipe("demo/full/adapt-droit")).key == "demo/full/base-general"
    assert prerequisite(find_recipe("demo/full/cpt")) is None


def test_cli_list_and_copy(tmp_path, capsys, monkeypatch):
    assert main(["recipes", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RECIPE", "TASK", "METHOD", "MODEL", "DESCRIPTION"]
    assert lines[1].split()[:3] == ["demo/dpo/dpo-register", "dpo", "lora"]
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "copy", "demo/lora/sft-qa", "recipes"]) == 0
    out = capsys.readouterr().out
    assert "copied 4 files into recipes" in out and "demo/full/cpt trains (runs/demo-cpt/final)" in out
    assert "affinage train recipes/demo/lora/sft-qa.yaml" in out
    assert main(["recipes", "copy", "demo/lora/sft-qa", "recipes"]) == 2
    assert "4 file(s) already exist" in capsys.readouterr().err
