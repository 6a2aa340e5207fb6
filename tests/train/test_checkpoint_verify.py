"""Checkpoints verify themselves: sizes + checksums in the COMPLETE marker, a corrupt newest one is set aside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from affinage.recipe.loader import load_recipe
from affinage.run import RunDir
from affinage.train import checkpoint as ckpt
from affinage.train.callbacks import truncate_metrics
from affinage.train.trainer import train

from test_train_e2e import StopAt, write_recipe  # noqa: E402  (same folder: the e2e recipe writer)


def _make(folder: Path, step: int) -> Path:
    p = folder / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (p / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    ckpt.mark_complete(p, step)
    return p


def _flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,says", [
    (lambda p: _flip(p / "model.safetensors"), "does not match its"),
    (lambda p: (p / "model.safetensors").write_bytes(b"short"), "truncated or overwritten"),
    (lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda p: (p / "trainer_state.json").write_text('{"global_step": 99}'), "trainer_state.json"),
    (lambda p: (p / "COMPLETE").write_text("{not json"), "marker is unreadable"),
])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage, says):
    _make(tmp_path, 2)
    newest = _make(tmp_path, 4)
    assert ckpt.problem(newest) is None
    damage(newest)
    said: list[str] = []
    found = ckpt.newest_resumable(tmp_path, say=said.append)
    assert found.name == "checkpoint-2"
    assert says in said[0] and "checkpoint-4 is corrupt" in said[0]
    assert (tmp_path / "corrupt-checkpoint-4").is_dir() and not newest.exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2"]  # rotation never counts it


def test_wrong_step_in_trainer_state_without_checksums(tmp_path):
    p = _make(tmp_path, 4)
    # an old marker (no checksums) still gets its trainer_state.json checked
    (p / "COMPLETE").write_text(json.dumps({"step": 4}))
    (p / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert "says step 3, not 4" in ckpt.problem(p)


def test_all_corrupt_is_refused_not_restarted(tmp_path):
    _flip(_make(tmp_path, 2) / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="Rerun with --fresh"):
        ckpt.newest_resumable(tmp_path, say=lambda m: None)


def test_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4, 5)) + '{"step": 6, "lo')
    assert truncate_metrics(path, 3) == 3
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]


def test_corrupt_checkpoint_resume_equals_uninterrupted(tmp_path, tiny_llama_dir, demo_data):
    """Flipped bytes in the newest checkpoint's optimizer state: reported, previous checkpoint used, same weights."""
    data = demo_data / "qa_culture.jsonl"
    extra = "  save_every: 2\n  logging_steps: 1\n"
    ref = load_recipe(write_recipe(tmp_path / "ref", tiny_llama_dir, data, steps=8, extra=extra))
    ref_run = RunDir.create(ref.run_dir())
    train(ref, ref_run)

    recipe = load_recipe(write_recipe(tmp_path / "cut", tiny_llama_dir, data, steps=8, extra=extra))
    run = RunDir.create(recipe.run_dir())
    first = train(recipe, run, callbacks=[StopAt(run, 5)])
    assert first.steps == 6
    assert [p.name for p in ckpt.complete_checkpoints(run.checkpoints)] == ["checkpoint-4", "checkpoint-6"]
    _flip(run.checkpoints / "checkpoint-6" / "optimizer.pt", at=5000)
    second = train(recipe, run)
    assert second.completed and second.resumed_from.endswith("checkpoint-4")
    a = load_file(ref_run.final / "adapter_model.safetensors")
    b = load_file(run.final / "adapter_model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [m["step"] for m in run.read_metrics() if "loss" in m]
    assert steps == sorted(set(steps)) == list(range(1, 9)), steps  # one line per step across the resume
