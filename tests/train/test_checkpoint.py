"""Checkpoints count only when complete; rotation never leaves us without a complete one."""

from pathlib import Path

from affinage.train import checkpoint as ckpt


def _make(folder: Path, step: int, complete: bool) -> Path:
    p = folder / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "model.safetensors").write_bytes(b"x")
    if complete:
        ckpt.mark_complete(p, step)
    return p


def test_newest_complete_ignores_half_written(tmp_path):
    _make(tmp_path, 10, True)
    _make(tmp_path, 20, True)
    _make(tmp_path, 30, False)  # killed while writing
    assert ckpt.newest_complete_checkpoint(tmp_path).name == "checkpoint-20"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


def test_steps_sort_numerically_not_lexically(tmp_path):
    _make(tmp_path, 9, True)
    _make(tmp_path, 100, True)
    assert ckpt.newest_complete_checkpoint(tmp_path).name == "checkpoint-100"


def test_remove_incomplete_and_rotate(tmp_path):
    for s in (1, 2, 3):
        _make(tmp_path, s, True)
    _make(tmp_path, 4, False)
    removed = ckpt.remove_incomplete(tmp_path)
    assert [p.name for p in removed] == ["checkpoint-4"]
    old = ckpt.rotate(tmp_path, keep=2)
    assert [p.name for p in old] == ["checkpoint-1"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]


def test_rotate_never_counts_incomplete(tmp_path):
    _make(tmp_path, 1, True)
    _make(tmp_path, 2, False)
    assert ckpt.rotate(tmp_path, keep=1) == []
    assert ckpt.newest_complete_checkpoint(tmp_path).name == "checkpoint-1"


def test_no_checkpoint_folder(tmp_path):
    assert ckpt.newest_complete_checkpoint(tmp_path / "missing") is None
