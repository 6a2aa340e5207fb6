"""A full disk during a checkpoint write: a clear error, the previous checkpoint intact, a rerun ends equal."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from affinage.errors import DiskFullError
from affinage.recipe.loader import load_recipe
from affinage.run import RunDir
from affinage.train import checkpoint as ckpt
from affinage.train.trainer import train

from test_train_e2e import write_recipe  # noqa: E402


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 MiB tmpfs (needs root, as CI runs): a file system that really fills up."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class FillDiskAfter(TrainerCallback):
    """Once checkpoint-N is complete, fill the file system, leaving less than a checkpoint."""

    def __init__(self, run: RunDir, step: int, filler: Path, leave: int):
        self.run, self.step, self.filler, self.leave = run, step, filler, leave

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step and not self.filler.exists():
            free = shutil.disk_usage(self.filler.parent).free
            with open(self.filler, "wb") as fh:
                fh.write(b"\0" * max(0, free - self.leave))


def test_disk_full_during_checkpoint(tmp_path, small_tmpfs, tiny_llama_dir, demo_data):
    data = demo_data / "qa_culture.jsonl"
    extra = "  save_every: 2\n"
    ref = load_recipe(write_recipe(tmp_path / "ref", tiny_llama_dir, data, steps=6, kind="full", extra=extra))
    ref_run = RunDir.create(ref.run_dir())
    train(ref, ref_run)
    size = sum(p.stat().st_size for p in (ref_run.checkpoints / "checkpoint-6").rglob("*") if p.is_file())

    recipe = load_recipe(write_recipe(small_tmpfs / "cut", tiny_llama_dir, data, steps=6, kind="full", extra=extra))
    run = RunDir.create(recipe.run_dir())
    filler = small_tmpfs / "filler"
    with pytest.raises(DiskFullError) as e:
        train(recipe, run, callbacks=[FillDiskAfter(run, 3, filler, leave=size // 3)])
    text = str(e.value)
    assert "no space left" in text and "checkpoint-2, is intact" in text and "rerun" in text
    good = ckpt.newest_complete_checkpoint(run.checkpoints)
    assert good.name == "checkpoint-2" and ckpt.problem(good) is None  # verified: sizes and checksums

    filler.unlink()  # space freed: the same command resumes
    again = train(recipe, run)
    assert again.completed and again.resumed_from.endswith("checkpoint-2")
    a, b = load_file(ref_run.final / "model.safetensors"), load_file(run.final / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [m["step"] for m in run.read_metrics() if "loss" in m]
    assert steps == sorted(set(steps))
