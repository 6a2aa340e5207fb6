"""SIGTERM (scancel, preemption) on a real `affinage train` process: a complete checkpoint, exit 4,
and a resume that ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from affinage.recipe.loader import load_recipe
from affinage.run import EXIT_SIGTERM, RunDir
from affinage.train import checkpoint as ckpt
from affinage.train.trainer import train
from test_train_e2e import write_recipe
from testlib import REPO

STEPS = 20


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    return env


def test_sigterm_writes_a_complete_checkpoint_and_resume_is_bitwise_equal(tmp_path, tiny_llama_dir, demo_data):
    data = demo_data / "qa_culture.jsonl"
    ref = load_recipe(write_recipe(tmp_path / "ref", tiny_llama_dir, data, steps=STEPS, records=16))
    ref_run = RunDir.create(ref.run_dir())
    train(ref, ref_run)

    path = write_recipe(tmp_path / "cut", tiny_llama_dir, data, steps=STEPS, records=16)
    run = RunDir(load_recipe(path).run_dir())
    cmd = [sys.executable, "-m", "affinage.cli", "train", str(path)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len([r for r in run.read_metrics() if "loss" in r]) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    took = time.time() - sent
    assert proc.returncode == EXIT_SIGTERM, out[-3000:]
    assert "stopped by SIGTERM" in out
    found = ckpt.newest_complete_checkpoint(run.checkpoints)
    assert found is not None and 3 <= ckpt.checkpoint_step(found) < STEPS, out[-2000:]
    summary = json.loads(run.summary.read_text())
    assert summary["stopped_by"] == "SIGTERM" and not summary["completed"]
    assert took < 60, f"{took:.1f} s from SIGTERM to exit"

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    a = load_file(ref_run.final / "adapter_model.safetensors")
    b = load_file(run.final / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads(run.summary.read_text())["steps"] == STEPS
