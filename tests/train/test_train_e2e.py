"""End-to-end training of tiny models through the real Trainer glue: real numbers, not exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from affinage.recipe.loader import load_recipe
from affinage.run import RunDir
from affinage.train.trainer import STOP_FILE, train


def write_recipe(tmp_path: Path, model_dir: Path, data: Path, *, task="sft", kind="lora", steps=8, extra="", records=48) -> Path:
    fmt = "chat" if task == "sft" else "text"
    method = {"lora": "method: {kind: lora, lora: {r: 8, alpha: 16, dropout: 0.0}}",
              "qlora": "method: {kind: qlora, lora: {r: 8, alpha: 16, dropout: 0.0}, quantization: {compute_dtype: float32}}",
              "full": "method: {kind: full}"}[kind]
    text = f"""
name: t-{task}-{kind}
task: {task}
seed: 7
model: {{name_or_path: {model_dir}, dtype: float32}}
{method}
data:
  sources: [{{path: {data}, format: {fmt}, max_records: {records}}}]
  max_length: 96
training:
  global_batch_size: 4
  micro_batch_size: 2
  duration: {steps} steps
  learning_rate: {"1e-2" if kind != "full" else "2e-3"}
  lr_scheduler: constant
  report_to: [none]
{extra}
output: {{dir: {tmp_path / 'run'}}}
"""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def losses(run: RunDir) -> list[float]:
    return [m["loss"] for m in run.read_metrics() if "loss" in m]


def test_lora_sft_loss_decreases_and_saves_adapter_only(tmp_path, pretrained_tiny_dir, demo_data):
    recipe = load_recipe(write_recipe(tmp_path, pretrained_tiny_dir, demo_data / "qa_culture.jsonl", steps=16, records=16))
    run = RunDir.create(recipe.run_dir())
    result = train(recipe, run)
    ls = losses(run)
    assert result.completed and result.steps == 16
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.1, ls
    assert (run.final / "adapter_config.json").exists()
    assert not (run.final / "model.safetensors").exists()
    summary = json.loads(run.summary.read_text())
    assert summary["gradient_accumulation"] == 2 and summary["tokens_seen"] > 0
    k = summary["kernels"]  # what ran and why (affinage.train.kernels), training.kernels left at auto
    assert k["attention"] == "affinage_varlen" and k["loss"] == "plain" and k["compile"]["on"] is False
    if not torch.cuda.is_available():
        assert k["liger"] == {"setting": "auto", "on": False, "why": "needs CUDA (Triton kernels); this machine has none"}
    stats = json.loads(run.data_stats.read_text())
    assert stats  # per-source statistics were written


def test_full_cpt_loss_decreases_and_is_reproducible(tmp_path, tiny_llama_dir, demo_data):
    finals = []
    for attempt in ("a", "b"):
        recipe = load_recipe(
            write_recipe(tmp_path / attempt, tiny_llama_dir, demo_data / "droit.jsonl", task="cpt", kind="full", steps=10)
        )
        run = RunDir.create(recipe.run_dir())
        result = train(recipe, run)
        ls = losses(run)
        assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.3, ls
        finals.append(result.loss_last)
        assert (run.final / "model.safetensors").exists()
    assert finals[0] == finals[1]  # same recipe, same seed: the same final loss on CPU


def test_qlora_trains_on_cpu(tmp_path, pretrained_tiny_dir, demo_data):
    pytest.importorskip("bitsandbytes")
    recipe = load_recipe(write_recipe(tmp_path, pretrained_tiny_dir, demo_data / "qa_culture.jsonl", kind="qlora", steps=16, records=16))
    run = RunDir.create(recipe.run_dir())
    result = train(recipe, run)
    ls = losses(run)
    assert result.completed
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.05, ls


class StopAt(TrainerCallback):
    """Asks for a stop the way a SLURM job does: by creating the stop file."""

    def __init__(self, run: RunDir, step: int):
        self.run, self.step = run, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            (self.run.root / STOP_FILE).touch()


def test_stop_then_resume_equals_uninterrupted_bitwise(tmp_path, tiny_llama_dir, demo_data):
    data = demo_data / "qa_culture.jsonl"
    extra = "  save_every: 4\n"
    ref = load_recipe(write_recipe(tmp_path / "ref", tiny_llama_dir, data, steps=8, extra=extra))
    ref_run = RunDir.create(ref.run_dir())
    train(ref, ref_run)

    recipe = load_recipe(write_recipe(tmp_path / "cut", tiny_llama_dir, data, steps=8, extra=extra))
    run = RunDir.create(recipe.run_dir())
    first = train(recipe, run, callbacks=[StopAt(run, 5)])
    assert not first.completed and first.steps == 6
    assert (run.checkpoints / "checkpoint-6" / "COMPLETE").exists()
    # a half-written checkpoint from a killed job must be ignored and removed
    (run.checkpoints / "checkpoint-7").mkdir()
    second = train(recipe, run)
    assert second.completed and second.resumed_from.endswith("checkpoint-6")
    a = load_file(ref_run.final / "adapter_model.safetensors")
    b = load_file(run.final / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(ref_run)[-1] == losses(run)[-1]
