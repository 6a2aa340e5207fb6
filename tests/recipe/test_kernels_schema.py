"""The training.kernels section: strict values, defaults, the dpo/kto refusal, file:line errors, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest

from affinage.recipe.loader import RecipeError, load_recipe
from affinage.train.identity import is_resumable

BASE = """\
name: k
task: {task}
model: {{name_or_path: some/model}}
data: {{sources: [{{path: d.jsonl{fmt}}}], max_length: 256}}
training:
  global_batch_size: 4
  duration: 10 steps
{kernels}"""


def write(tmp_path: Path, kernels: str = "", task: str = "sft") -> Path:
    (tmp_path / "d.jsonl").write_text("{}\n")
    p = tmp_path / "r.yaml"
    fmt = ", format: preference" if task == "dpo" else ""
    p.write_text(BASE.format(task=task, fmt=fmt, kernels=kernels), encoding="utf-8")
    return p


def test_defaults_are_auto_and_values_are_read(tmp_path):
    r = load_recipe(write(tmp_path))
    assert (r.training.kernels.liger, r.training.kernels.compile) == ("auto", "auto")
    r = load_recipe(write(tmp_path, "  kernels: {liger: on, compile: off}\n"))  # YAML 1.1 on/off stay the strings
    assert (r.training.kernels.liger, r.training.kernels.compile) == ("on", "off")


@pytest.mark.parametrize("kernels,says", [
    ("  kernels: {liger: yes please}\n", "liger"),
    ("  kernels: {flash: on}\n", "flash"),
    ("  kernels: {compile: max-autotune}\n", "compile"),
])
def test_unknown_keys_and_values_are_refused_at_their_line(tmp_path, kernels, says):
    with pytest.raises(RecipeError, match=says) as e:
        load_recipe(write(tmp_path, kernels))
    assert "r.yaml:8" in str(e.value)


def test_compile_on_is_refused_for_preference_tasks(tmp_path):
    with pytest.raises(RecipeError, match="compile: on with task: dpo"):
        load_recipe(write(tmp_path, "  kernels: {compile: on}\n", task="dpo"))
    assert load_recipe(write(tmp_path, "  kernels: {liger: off}\n", task="dpo")).training.kernels.liger == "off"


def test_kernels_may_change_on_resume():
    assert is_resumable("training.kernels.liger") and is_resumable("training.kernels.compile")
    assert not is_resumable("training.loss.kind")
