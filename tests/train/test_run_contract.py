"""The run directory's contract on a real tiny run: reruns, resume identity, STOP, torn metrics."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from affinage.recipe.loader import load_recipe
from affinage.run import RunDir
from affinage.train import checkpoint as ckpt
from affinage.train.identity import RunChangedError
from affinage.train.trainer import DurationCutError, train
from test_train_e2e import StopAt, write_recipe


def tree_bytes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def recipe_at(tmp_path, model_dir, data, steps=4, extra="  save_every: 2\n", **kw):
    return load_recipe(write_recipe(tmp_path, model_dir, data, steps=steps, extra=extra, records=16, **kw))


@pytest.fixture
def finished(tmp_path, tiny_llama_dir, demo_data):
    """A finished 4-step LoRA SFT run with checkpoints every 2 steps."""
    recipe = recipe_at(tmp_path, tiny_llama_dir, demo_data / "qa_culture.jsonl")
    run = RunDir.create(recipe.run_dir())
    first = train(recipe, run)
    assert first.completed and first.steps == 4
    return recipe, run


def test_rerun_of_finished_run_trains_nothing_and_rewrites_nothing(finished):
    recipe, run = finished
    before, summary, metrics = tree_bytes(run.final), run.summary.read_bytes(), run.metrics.read_bytes()
    again = train(recipe, run)
    assert again.already_complete and again.completed and again.exit_code == 0
    assert again.steps == 4 and again.max_steps == 4 and again.steps_this_session == 0
    assert tree_bytes(run.final) == before
    assert run.summary.read_bytes() == summary and run.metrics.read_bytes() == metrics
    assert [ckpt.checkpoint_step(p) for p in ckpt.complete_checkpoints(run.checkpoints)] == [2, 4]


def test_extended_duration_continues_from_the_last_checkpoint(finished, tmp_path, tiny_llama_dir, demo_data):
    _, run = finished
    longer = recipe_at(tmp_path, tiny_llama_dir, demo_data / "qa_culture.jsonl", steps=6)
    result = train(longer, run)
    assert result.completed and not result.already_complete
    assert (result.steps, result.max_steps, result.steps_this_session) == (6, 6, 2)
    assert result.resumed_from.endswith("checkpoint-4")


@pytest.mark.parametrize("change, key", [
    ({"learning_rate": "1e-3"}, "training.learning_rate"),
    ({"seed": 8}, "seed"),
    ({"data": "droit"}, "data.sources[0].path"),
    ({"model": "other"}, "model.name_or_path"),
])
def test_changed_identity_is_refused_with_the_keys(finished, tmp_path, tiny_llama_dir, pretrained_tiny_dir, demo_data, change, key):
    _, run = finished
    text = write_recipe(tmp_path, tiny_llama_dir, demo_data / "qa_culture.jsonl", steps=4, extra="  save_every: 2\n", records=16).read_text()
    if "learning_rate" in change:
        text = text.replace("learning_rate: 1e-2", f"learning_rate: {change['learning_rate']}")
    if "seed" in change:
        text = text.replace("seed: 7", "seed: 8")
    if "data" in change:
        text = text.replace(str(demo_data / "qa_culture.jsonl"), str(demo_data / "qa_alpaca.jsonl")).replace("format: chat", "format: alpaca")
    if "model" in change:
        text = text.replace(str(tiny_llama_dir), str(pretrained_tiny_dir))
    (tmp_path / "changed.yaml").write_text(text)
    final = tree_bytes(run.final)
    with pytest.raises(RunChangedError) as e:
        train(load_recipe(tmp_path / "changed.yaml"), run)
    message = str(e.value)
    assert key in message and f"--allow-change {key}" in message and "--run-dir NEW_DIR" in message
    assert tree_bytes(run.final) == final  # nothing rewritten


def test_allow_change_is_recorded_with_its_step(tmp_path, tiny_llama_dir, demo_data):
    recipe = recipe_at(tmp_path, tiny_llama_dir, demo_data / "qa_culture.jsonl")
    run = RunDir.create(recipe.run_dir())
    first = train(recipe, run, callbacks=[StopAt(run, 1)])
    assert not first.completed and first.steps == 2 and first.exit_code == 3
    assert not run.stop_file.exists()  # a STOP honoured mid-run is consumed: the rerun resumes
    text = (tmp_path / "recipe.yaml").read_text().replace("learning_rate: 1e-2", "learning_rate: 5e-3")
    (tmp_path / "recipe.yaml").write_text(text)
    changed = load_recipe(tmp_path / "recipe.yaml")
    with pytest.raises(RunChangedError):
        train(changed, run)
    result = train(changed, run, allow_change=["training.learning_rate"])
    assert result.completed and result.steps == 4
    doc = run.read_identity()
    assert doc["changes"] == [dict(doc["changes"][0], step=2, key="training.learning_rate", **{"from": 0.01, "to": 0.005})]
    assert doc["identity"] != doc["first_identity"]
    from affinage.provenance import write_run_provenance

    write_run_provenance(changed, run, result)
    manifest = json.loads(run.provenance.read_text())
    assert manifest["identity"]["changes"][0]["key"] == "training.learning_rate"
    assert manifest["identity"]["changes"][0]["step"] == 2


def test_stop_file_present_before_training_is_honoured_not_deleted(tmp_path, tiny_llama_dir, demo_data, capsys):
    recipe = recipe_at(tmp_path, tiny_llama_dir, demo_data / "qa_culture.jsonl")
    run = RunDir.create(recipe.run_dir())
    run.stop_file.touch()
    result = train(recipe, run)
    assert not result.completed and result.steps == 0 and result.exit_code == 3
    assert result.stopped_by == "STOP file before training"
    assert run.stop_file.exists() and not run.final.exists()
    assert "stopping after loading" in capsys.readouterr().out


def test_resumed_summary_never_shows_more_steps_than_the_duration(finished, tmp_path, tiny_llama_dir, demo_data):
    """transformers 5 trains one more step when resumed from a checkpoint at max_steps (25/24)."""
    recipe, run = finished
    import shutil

    shutil.rmtree(run.final)  # killed after the last checkpoint, before final/ was written
    result = train(recipe, run)
    assert result.completed and (result.steps, result.max_steps) == (4, 4)
    assert json.loads(run.summary.read_text())["steps"] == 4
    assert (run.final / "adapter_model.safetensors").exists()
    assert [ckpt.checkpoint_step(p) for p in ckpt.complete_checkpoints(run.checkpoints)] == [2, 4]
    shorter = recipe_at(tmp_path, tiny_llama_dir, demo_data / "qa_culture.jsonl", steps=2)
    with pytest.raises(DurationCutError, match="at least 4 steps"):
        train(shorter, run)


def test_a_torn_metrics_line_does_not_break_the_run(tmp_path, tiny_llama_dir, demo_data):
    recipe = recipe_at(tmp_path, tiny_llama_dir, demo_data / "qa_culture.jsonl")
    run = RunDir.create(recipe.run_dir())
    train(recipe, run, callbacks=[StopAt(run, 1)])
    with run.metrics.open("a") as fh:
        fh.write('{"step": 3, "loss": 1.2')  # a kill in the middle of a write
    assert run.torn_metrics_lines() == 1 and all("step" in r for r in run.read_metrics())
    result = train(recipe, run)
    assert result.completed and result.torn_metrics_lines == 1
    lines = run.metrics.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and run.torn_metrics_lines() == 0
    steps = [r["step"] for r in run.read_metrics() if "loss" in r]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]


def test_no_dollar_variable_reaches_the_card_or_report(tmp_path, tiny_llama_dir, demo_data, monkeypatch):
    import re

    from affinage.provenance import write_run_provenance

    monkeypatch.setenv("AFFINAGE_TEST_MODEL_DIR", str(tiny_llama_dir))
    path = write_recipe(tmp_path, "$AFFINAGE_TEST_MODEL_DIR", demo_data / "qa_culture.jsonl", steps=1, records=8)
    recipe = load_recipe(path)
    run = RunDir.create(recipe.run_dir())
    result = train(recipe, run)
    write_run_provenance(recipe, run, result)
    for f in (run.final / "README.md", run.report, run.root / "ai_act_summary.md"):
        text = f.read_text()
        assert not re.search(r"\$\{?[A-Z_]{2,}", text), (f, re.findall(r".{30}\$\{?[A-Z_]{2,}.{10}", text))
    assert str(tiny_llama_dir) in (run.final / "README.md").read_text()
    manifest = json.loads(run.provenance.read_text())
    assert manifest["base_model"]["name_or_path"] == str(tiny_llama_dir)


def test_modes_of_a_real_run_follow_a_002_umask(tmp_path, tiny_llama_dir, demo_data, monkeypatch):
    """A project group shares caches and runs: nothing comes out 0700/0600 under umask 002."""
    import os
    import stat

    monkeypatch.setenv("AFFINAGE_CACHE", str(tmp_path / "cache"))
    saved = os.umask(0o002)
    try:
        recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir, demo_data / "droit.jsonl", task="cpt", kind="full", steps=1))
        run = RunDir.create(recipe.run_dir())
        train(recipe, run)
    finally:
        os.umask(saved)

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    cache_folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert cache_folders and all(mode(p) == 0o775 for p in cache_folders), {p.name: oct(mode(p)) for p in cache_folders}
    for f in (run.final / "model.safetensors", run.summary, run.metrics, run.identity, run.data_stats):
        assert mode(f) == 0o664, (f, oct(mode(f)))
    assert mode(run.root) == mode(run.final) == 0o775


def test_cpt_with_chat_marker_bos_eos_is_reported():
    from types import SimpleNamespace

    from affinage.recipe.loader import load_recipe_dict
    from affinage.train.trainer import cpt_marker_note

    def recipe(task):
        fmt = "text" if task == "cpt" else "chat"
        return load_recipe_dict({"name": "m", "task": task, "model": {"name_or_path": "x"},
                                 "data": {"sources": [{"path": "d.jsonl", "format": fmt}]},
                                 "training": {"global_batch_size": 1, "duration": "1 steps"}})

    smollm = SimpleNamespace(bos_token="<|im_start|>", eos_token="<|im_end|>")
    llama = SimpleNamespace(bos_token="<s>", eos_token="</s>")
    note = cpt_marker_note(recipe("cpt"), smollm)
    assert "BOS <|im_start|>" in note and "EOS <|im_end|>" in note
    assert cpt_marker_note(recipe("cpt"), llama) is None and cpt_marker_note(recipe("sft"), smollm) is None
