"""``affinage inspect``: the prepared samples with loss marked, on the shipped recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testlib import REPO

sys.path.insert(0, str(REPO / "tests" / "data"))
from data_helpers import HAS_SHARED, SHARED  # noqa: E402


def affinage(*args: str, env_extra: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "affinage.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_inspect_json_segments_cover_the_sample_and_match_the_cache(tmp_path):
    cache = {"AFFINAGE_CACHE": str(tmp_path / "cache")}
    r = affinage("inspect", "recipes/demo/lora/sft-qa.yaml", "--samples", "4", "--json",
                 "--set", "model.tokenizer=recipes/demo/model", env_extra=cache)
    assert r.returncode == 0, r.stderr
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(objs) == 4
    for o in objs:
        text = "".join(s["text"] for s in o["segments"])
        loss = [s["text"] for s in o["segments"] if s["loss"]]
        assert text.startswith("<|im_start|>user\n") and loss
        assert all(t.endswith("<|im_end|>") for t in loss)  # each reply ends with its marker
        assert not any("<|im_start|>" in t for t in loss)  # never a role header
        assert o["tokens"] > o["loss_tokens"] > 0 and o["truncated"] is False
    # the same cache prepare/train use: a second run finds it
    r2 = affinage("inspect", "recipes/demo/lora/sft-qa.yaml", "--samples", "1", "--set", "model.tokenizer=recipes/demo/model", env_extra=cache)
    assert r2.returncode == 0 and "(hit)" in r2.stdout and "[[" in r2.stdout and "\x1b[" not in r2.stdout


@pytest.mark.parametrize("recipe", ["recipes/demo/full/cpt.yaml", "recipes/demo/full/base-general.yaml", "recipes/demo/full/adapt-droit.yaml"])
def test_inspect_works_on_the_demo_cpt_recipes(tmp_path, recipe):
    r = affinage("inspect", recipe, "--samples", "1", env_extra={"AFFINAGE_CACHE": str(tmp_path)})
    if r.returncode != 0:  # a stage whose model is the previous stage's output: a clear error, and the fix
        assert "--set model.tokenizer=PATH" in r.stderr, r.stderr
        r = affinage("inspect", recipe, "--samples", "1", "--set", "model.tokenizer=recipes/demo/model",
                     env_extra={"AFFINAGE_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "── sample 0" in r.stdout and "with loss" in r.stdout


def test_inspect_7b_recipe_without_its_model_is_a_clear_error(tmp_path):
    r = affinage("inspect", "recipes/qwen2.5-7b/lora/sft-piaf.yaml", env_extra={"AFFINAGE_CACHE": str(tmp_path), "WORK": str(tmp_path)})
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "--set model.tokenizer=PATH" in r.stderr


@pytest.mark.skipif(not HAS_SHARED, reason="needs ../shared (real tokenizers and corpora)")
@pytest.mark.parametrize("recipe, tok, data", [
    ("recipes/qwen2.5-7b/lora/sft-piaf.yaml", "qwen2.5-instruct", "fr_instruct_piaf_qa.jsonl"),
    ("recipes/lucie-7b/lora/sft-piaf.yaml", "lucie-7b-instruct", "fr_instruct_piaf_qa.jsonl"),
    ("recipes/mistral-7b/qlora/cpt-legal.yaml", "mistral-7b-instruct-v0.3", "fr_legal_codes.jsonl"),
])
def test_inspect_7b_recipes_with_their_real_tokenizer(tmp_path, recipe, tok, data):
    (tmp_path / "data").mkdir()
    lines = (SHARED / "data" / data).read_text(encoding="utf-8").splitlines()[:40]
    (tmp_path / "data" / data).write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = affinage("inspect", recipe, "--samples", "2", "--json", "--set", f"model.tokenizer={SHARED / 'tokenizers' / tok}",
                 env_extra={"AFFINAGE_CACHE": str(tmp_path / "cache"), "WORK": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(objs) == 2
    for o in objs:
        loss = "".join(s["text"] for s in o["segments"] if s["loss"])
        if "cpt" in recipe:  # every token after the first is predicted
            assert o["loss_tokens"] == o["tokens"] - 1
        else:
            assert loss and "Texte :" not in loss and "assistant" not in loss
