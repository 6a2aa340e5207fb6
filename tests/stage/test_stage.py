"""`affinage stage`: every file a recipe reads copied into one folder, a manifest that proves it, no copy twice."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from testlib import REPO

from affinage.hashing import sha256_file
from affinage.recipe.loader import load_recipe
from affinage.stage import StageError, stage

DEMO = REPO / "recipes" / "demo"


def test_stage_copies_model_data_eval_sets_and_lm_eval_tasks_with_a_manifest(tmp_path):
    out = tmp_path / "staged"
    result = stage(DEMO / "full" / "adapt-droit.yaml", out, overrides=[f"model.name_or_path={DEMO / 'model'}"])
    keys = {i.key for i in result.items}
    assert keys == {"model.name_or_path", "data.sources.0.path", "data.sources.1.path", "eval.perplexity.0.path",
                    "eval.perplexity.1.path", "eval.mcq.0.path", "eval.mcq.1.path", "eval.generation.path",
                    "eval.lm_eval.include_path"}
    manifest = json.loads(result.manifest.read_text())
    files = {f["path"]: f for f in manifest["files"]}
    assert "eval/lm_eval_tasks/demo_droit_qcm.yaml" in files and "models/model/config.json" in files
    for rel, f in files.items():
        assert (out / rel).stat().st_size == f["size"] and sha256_file(out / rel) == f["sha256"], rel
        assert sha256_file(Path(f["source"])) == f["sha256"]
    assert manifest["bytes"] == sum(f["size"] for f in files.values()) == result.bytes_total

    staged = load_recipe(result.recipe)
    paths = [staged.model.name_or_path, *(s.path for s in staged.data.sources), *(s.path for s in staged.eval.perplexity),
             *(s.path for s in staged.eval.mcq), staged.eval.generation.path, staged.eval.lm_eval.include_path]
    assert all(Path(p).is_relative_to(out) and Path(p).exists() for p in paths), paths
    assert staged.model.mirrors == [] and staged.data.sources[0].name == "droit"

    again = stage(DEMO / "full" / "adapt-droit.yaml", out, overrides=[f"model.name_or_path={DEMO / 'model'}"])
    assert again.copied == [] and sorted(again.kept) == sorted(files)


def test_restaging_copies_only_what_changed_or_was_damaged(tmp_path):
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    for name in ("a.jsonl", "b.jsonl"):
        (src / "data" / name).write_text((DEMO / "data" / "histoire.jsonl").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: t
task: cpt
model: {{name_or_path: {DEMO / 'model'}, init: random}}
data: {{sources: [{{path: {src / 'data' / 'a.jsonl'}, format: text}}, {{path: {src / 'data' / 'b.jsonl'}, format: text}}]}}
training: {{global_batch_size: 2, duration: 2 steps}}
""")
    out = tmp_path / "out"
    first = stage(recipe, out)
    assert len(first.copied) == 2 + len(list((DEMO / "model").iterdir()))
    (src / "data" / "a.jsonl").write_text("{\"text\": \"changé\"}\n")  # the source changed
    damaged = out / "data" / "1" / "b.jsonl"
    damaged.write_text("truncated")  # the copy was damaged
    second = stage(recipe, out)
    assert sorted(second.copied) == ["data/0/a.jsonl", "data/1/b.jsonl"]
    assert (out / "data" / "0" / "a.jsonl").read_text() == "{\"text\": \"changé\"}\n"
    assert damaged.read_text() == (src / "data" / "b.jsonl").read_text()
    # the staged recipe staged into its own folder again: nothing to copy
    third = stage(out / "recipe.yaml", out)
    assert third.copied == []


def test_a_model_not_on_this_machine_names_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: t
task: cpt
model: {{name_or_path: OpenLLM-France/Lucie-7B-Instruct, mirrors: []}}
data: {{sources: [{{path: {DEMO / 'data' / 'histoire.jsonl'}, format: text}}]}}
training: {{global_batch_size: 2, duration: 2 steps}}
""")
    with pytest.raises(StageError, match="--download"):
        stage(recipe, tmp_path / "out")


def test_download_without_network_fails_naming_the_url(tmp_path):
    """Run under the offline guard (as on a compute node): huggingface_hub is called and refused."""
    from affinage.offline import run_offline

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: t
task: cpt
model: {{name_or_path: OpenLLM-France/Lucie-7B-Instruct, mirrors: []}}
data: {{sources: [{{path: {DEMO / 'data' / 'histoire.jsonl'}, format: text}}]}}
training: {{global_batch_size: 2, duration: 2 steps}}
""")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    report = run_offline([[sys.executable, "-m", "affinage.cli", "stage", str(recipe), "--to", str(tmp_path / "out"), "--download"]], env=env)
    run = report.runs[0]
    assert run.returncode == 2, run.output
    assert "could not download OpenLLM-France/Lucie-7B-Instruct from https://huggingface.co/OpenLLM-France/Lucie-7B-Instruct" in run.output
    assert report.attempts and report.attempts[0]["host"] == "huggingface.co"
    assert "huggingface_hub" in " ".join(report.attempts[0]["stack"])
