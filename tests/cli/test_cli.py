"""The `affinage` command as a user runs it: exit codes, one-paragraph errors, the demo pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from testlib import REPO

DEMO_CPT = REPO / "recipes" / "demo" / "full" / "cpt.yaml"
DEMO_SFT = REPO / "recipes" / "demo" / "lora" / "sft-qa.yaml"


def affinage(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "affinage.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_bad_recipe_is_one_paragraph_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO_CPT.read_text().replace("  global_batch_size: 16", "  global_bach_size: 16"))
    p = affinage("plan", str(bad))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    line = next(i for i, l in enumerate(bad.read_text().splitlines(), 1) if "global_bach_size" in l)
    assert f"bad.yaml:{line}" in p.stderr and "did you mean 'global_batch_size'" in p.stderr.lower()


def test_bad_override_names_the_set(tmp_path):
    p = affinage("plan", str(DEMO_CPT), "--set", "training.learning_rat=1e-3")
    assert p.returncode == 2 and "--set training.learning_rat" in p.stderr and "learning_rate" in p.stderr


def test_missing_model_says_where_it_looked_and_how_to_stage(tmp_path):
    p = affinage("plan", str(DEMO_SFT), "--set", "model.name_or_path=someorg/absent-model", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "someorg/absent-model" in p.stderr and "HuggingFace_Models" in p.stderr and "download" in p.stderr


def test_plan_prints_parameters_steps_and_memory():
    p = affinage("plan", str(DEMO_CPT), "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["params_total"] == plan["params_trainable"] > 500_000  # full fine-tune of the demo Llama
    assert plan["steps"] > 100 and plan["gradient_accumulation"] == 2
    assert plan["memory_per_gpu"]["total"] > 0


def test_demo_pipeline_cpt_then_lora_sft_then_merge(tmp_path):
    cpt, sft = tmp_path / "cpt", tmp_path / "sft"
    p = affinage("train", str(DEMO_CPT), "--set", "training.duration=30 steps", "--run-dir", str(cpt))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "affinage summary" in p.stdout and "loss" in p.stdout
    s = json.loads((cpt / "summary.json").read_text())
    assert s["completed"] and s["loss_last"] < s["loss_first"] - 1.0
    assert "global_batch_size: 16" in (cpt / "recipe.yaml").read_text()  # the resolved recipe is kept

    p = affinage("train", str(DEMO_SFT), "--set", f"model.name_or_path={cpt / 'final'}",
                 "--set", "training.duration=12 steps", "--run-dir", str(sft))
    assert p.returncode == 0, p.stderr[-3000:]
    p = affinage("merge", str(sft))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (sft / "merged" / "model.safetensors").exists()
    report = json.loads((sft / "merged" / "merge_report.json").read_text())
    assert report["max_abs_logit_diff"] < 1e-4
