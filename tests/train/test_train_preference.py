"""DPO and KTO through TRL's trainers on a tiny pretrained Llama and the demo's French preference pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from affinage.recipe.loader import dump_resolved, load_recipe
from affinage.run import RunDir
from affinage.runlock import check_run_dir
from affinage.train.tasks import train
from affinage.train.trainer import STOP_FILE


def write_recipe(tmp_path: Path, model_dir: Path, data: Path, *, task="dpo", steps=16, records=64, extra="", pref="") -> Path:
    text = f"""
name: t-{task}
task: {task}
seed: 7
model: {{name_or_path: {model_dir}, dtype: float32}}
method: {{kind: lora, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
preference: {{beta: 0.1{pref}}}
data:
  sources: [{{path: {data}, format: preference, max_records: {records}}}]
  max_length: 160
  heldout_fraction: 0.25
  cache_dir: {tmp_path / 'cache'}
training:
  global_batch_size: 4
  micro_batch_size: 2
  duration: {steps} steps
  learning_rate: 1e-2
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


def test_dpo_loss_decreases_and_heldout_preference_accuracy_rises(tmp_path, pretrained_tiny_dir, demo_data):
    from affinage.evaluate import evaluate as run_eval  # eval, then report and card (what `affinage eval` runs)

    # One step's loss is over 4 pairs and swings by ±0.4, and Adam's first steps turn a CPU's rounding
    # into a different path (CI's machine saw other numbers than this one): a moderate learning rate, and
    # the mean of the last 8 steps. Checked on seeds 1, 2, 3 and 7 here: 0.29 to 0.45 against log 2 = 0.69.
    path = write_recipe(tmp_path, pretrained_tiny_dir, demo_data / "preferences.jsonl", steps=24)
    path.write_text(path.read_text().replace("learning_rate: 1e-2", "learning_rate: 2e-3"), encoding="utf-8")
    recipe = load_recipe(path)
    run = RunDir.create(recipe.run_dir())
    result = train(recipe, run)
    ls = losses(run)
    assert result.completed and result.train_samples == 48 and result.heldout_samples == 16
    assert abs(ls[0] - 0.6931) < 1e-3  # policy == reference at step 0: DPO loss is log 2
    assert sum(ls[-8:]) / 8 < ls[0] - 0.15, ls
    summary = json.loads(run.summary.read_text())
    assert summary["preference"]["reference"] == "adapter_disabled"
    assert not (run.final / "ref").exists()  # no reference copy of the adapter: TRL switches it off
    run.recipe.write_text(dump_resolved(recipe), encoding="utf-8")  # what `affinage train` writes
    res = run_eval(run.root, progress=False)
    e = res["preference"]
    assert e["pairs"] == 16
    assert e["tuned"]["accuracy_norm"] > e["base"]["accuracy_norm"]
    assert e["delta"]["margin"]["delta"] > 0, e["delta"]["margin"]  # +8.7 to +12.6 on those seeds, interval above 0
    assert e["reward_margin"]["value"] > 0
    assert "Preference pairs (held out)" in (run.root / "report.md").read_text()


# KTO's settings, set the way a user would (``--set``): write_recipe's 4 completions a step at lr 1e-2 (on which
# DPO learns) saturate KTO on this model (see the docstring below and issue 13's note)
KTO_SETTINGS = ["training.learning_rate=1e-3", "training.global_batch_size=8", "training.micro_batch_size=4"]


def _third_means(rows: list[dict], key: str) -> tuple[float, float]:
    """Means of ``key`` over the first and the last third of the logged steps (the steps that logged it)."""
    n = len(rows) // 3
    first = [m[key] for m in rows[:n] if key in m]
    last = [m[key] for m in rows[-n:] if key in m]
    return sum(first) / len(first), sum(last) / len(last)


def test_kto_loss_decreases(tmp_path, pretrained_tiny_dir, demo_data):
    """KTO learns here at lr 1e-3 with 8 completions a step; it did not at lr 1e-2 with 4 (issue 13).

    With lr 1e-2 and 4 completions a step, a few steps lower the log-probs of every completion,
    desirable ones too (the undesirable term pushes down without bound, the desirable one pulls up at
    most to 0, the LoRA shares its directions); the KL estimate turns negative and TRL clamps the
    reference point at 0 (the paper's z0 = max(0, KL)), so nothing absorbs the shared drift: rewards
    reach −15..−25, the sigmoids saturate (zero gradient) and each step's loss equals its fraction of
    desirable completions, 0.5 on average. DPO's loss sees only chosen − rejected, where the drift
    cancels. At lr 2e-3 it still hits 2 of 24 seeds, at 1e-3 none of 56. The per-step loss swings
    with each batch's mix of labels, so the checks compare the first and last thirds of 60 steps.
    """
    from affinage.evaluate import evaluate as run_eval

    path = write_recipe(tmp_path, pretrained_tiny_dir, demo_data / "preferences.jsonl", task="kto", steps=60)
    recipe = load_recipe(path, KTO_SETTINGS)
    run = RunDir.create(recipe.run_dir())
    result = train(recipe, run)
    rows = [m for m in run.read_metrics() if "loss" in m]
    assert result.completed and result.train_samples == 96  # 48 pairs unpaired into desirable + undesirable
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference at step 0: every sigmoid at 1/2
    # seeds 1-56 (the recipe's seed): first-third mean 0.464..0.496, last-third 0.345..0.398, drop 0.083..0.126
    first, last = _third_means(rows, "loss")
    assert last < first - 0.04, [m["loss"] for m in rows]
    # not the saturated collapse: desirable completions gain reward over undesirable ones (seeds 1-56: +0.91..+1.71
    # in the last third; a collapsed run reads −2..−6 there, and its loss thirds may still differ by chance: seed 2 at
    # lr 1e-2 went 0.51 → 0.40 with every sigmoid saturated)
    rc, rr = _third_means(rows, "rewards/chosen")[1], _third_means(rows, "rewards/rejected")[1]
    assert rc - rr > 0.3, (rc, rr)
    run.recipe.write_text(dump_resolved(recipe), encoding="utf-8")  # what `affinage train` writes
    e = run_eval(run.root, progress=False)["preference"]  # the held-out split stays pairs
    assert e["pairs"] == 16
    # seeds 1-24: per-token accuracy 0.19..0.63 → 0.63..0.94; summed margin +5.6..+15.7 nats (interval excludes 0
    # on 23 of 24 seeds, so it is not asserted)
    assert e["tuned"]["accuracy_norm"] > e["base"]["accuracy_norm"]
    assert e["delta"]["margin"]["delta"] > 0 and e["reward_margin"]["value"] > 0, e["delta"]["margin"]


class StopAt(TrainerCallback):
    def __init__(self, run: RunDir, step: int):
        self.run, self.step = run, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            (self.run.root / STOP_FILE).touch()


def test_dpo_stop_then_resume_equals_uninterrupted_bitwise_and_reuses_reference_logps(tmp_path, pretrained_tiny_dir, demo_data):
    data = demo_data / "preferences.jsonl"
    extra = "  save_every: 4\n"
    pref = ", reference: precomputed"
    ref = load_recipe(write_recipe(tmp_path / "ref", pretrained_tiny_dir, data, steps=8, records=24, extra=extra, pref=pref))
    ref_run = RunDir.create(ref.run_dir())
    train(ref, ref_run)

    recipe = load_recipe(write_recipe(tmp_path / "cut", pretrained_tiny_dir, data, steps=8, records=24, extra=extra, pref=pref))
    run = RunDir.create(recipe.run_dir())
    first = train(recipe, run, callbacks=[StopAt(run, 5)])
    assert not first.completed and first.steps == 6
    check_run_dir(run.root, recipe.name)  # `affinage train` resumes here: TRL's README.md is not left in checkpoints/
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    cached = sorted((run.root / "reference").glob("*.npz"))
    assert [p.name.split("-")[0] for p in cached] == ["eval", "train"]
    second = train(recipe, run)
    assert second.completed and second.resumed_from.endswith("checkpoint-6")
    events = json.loads(run.summary.read_text())["preference"]["reference_cache"]
    assert events and all(ev["hit"] for ev in events)  # the resumed job read the reference log-probs, did not recompute
    a = load_file(ref_run.final / "adapter_model.safetensors")
    b = load_file(run.final / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(ref_run)[-1] == losses(run)[-1]


def _sft_run(tmp_path: Path, model_dir: Path, demo_data: Path) -> Path:
    from affinage.recipe.loader import load_recipe_dict

    recipe = load_recipe_dict({
        "name": "sft-start", "task": "sft", "seed": 7, "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "method": {"kind": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"sources": [{"path": str(demo_data / "qa_culture.jsonl"), "format": "chat", "max_records": 16}],
                 "max_length": 96, "cache_dir": str(tmp_path / "cache")},
        "training": {"global_batch_size": 4, "micro_batch_size": 2, "duration": "4 steps", "learning_rate": 1e-2,
                     "report_to": ["none"]},
        "output": {"dir": str(tmp_path / "sft")},
    })
    run = RunDir.create(recipe.run_dir())
    train(recipe, run)
    run.recipe.write_text(dump_resolved(recipe), encoding="utf-8")
    return run.root


def test_dpo_starts_from_an_sft_run_merged_or_stacked(tmp_path, pretrained_tiny_dir, demo_data):
    sft = _sft_run(tmp_path, pretrained_tiny_dir, demo_data)
    data = demo_data / "preferences.jsonl"
    for start in ("merged", "stacked"):
        recipe = load_recipe(write_recipe(tmp_path / start, pretrained_tiny_dir, data, steps=4, records=16,
                                          pref=f", from_run: {sft}, start: {start}"))
        run = RunDir.create(recipe.run_dir())
        result = train(recipe, run)
        assert result.completed and abs(losses(run)[0] - 0.6931) < 1e-3  # the reference is the SFT model itself
        pref = json.loads(run.summary.read_text())["preference"]
        if start == "merged":
            assert (run.root / "start" / "model.safetensors").exists() and pref["stacked_adapter"] is None
            assert json.loads((run.root / "start" / "affinage-start.json").read_text())["adapter"] == str(sft / "final")
        else:
            assert pref["stacked_adapter"] == str(sft / "final") and not (run.root / "start").exists()
            # the SFT adapter kept training: its weights moved away from the SFT run's
            a, b = load_file(sft / "final" / "adapter_model.safetensors"), load_file(run.final / "adapter_model.safetensors")
            assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_reference_free_dpo_uses_no_reference(tmp_path, pretrained_tiny_dir, demo_data):
    recipe = load_recipe(write_recipe(tmp_path, pretrained_tiny_dir, demo_data / "preferences.jsonl", steps=8, records=16,
                                      pref=", reference: none, loss_type: sigmoid_norm"))
    run = RunDir.create(recipe.run_dir())
    result = train(recipe, run)
    ls = losses(run)
    assert result.completed and abs(ls[0] - 0.6931) > 1e-3  # scores are the policy's own, not policy − reference
    assert sum(ls[-3:]) / 3 < ls[0], ls
    assert not (run.root / "reference").exists()
    assert json.loads(run.summary.read_text())["preference"]["reference"] == "none"
