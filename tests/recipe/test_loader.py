"""Recipe loading: base composition, --set overrides, path resolution, and file:line error messages.

Each ``bad/*.yaml`` starts with what its error must say:
``# expect: [FILE:]LINE KEY`` (one per expected problem; KEY ``-`` for file-level errors; FILE
relative to ``bad/`` when the error is in another file) and ``# says: TEXT`` (case-insensitive).
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from affinage.recipe import (
    Recipe,
    RecipeError,
    dump_resolved,
    load_recipe,
    load_recipe_dict,
    load_recipe_with_sources,
    write_resolved,
)

BAD = Path(__file__).parent / "bad"

MINIMAL = """\
name: t
task: sft
model: {name_or_path: ./tiny-model}
data:
  sources: [{path: data.jsonl, format: chat}]
  max_length: 128
training:
  global_batch_size: 8
  micro_batch_size: 2
  duration: 20 steps
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def expectations(path: Path) -> tuple[list[tuple[str, int, str]], list[str]]:
    expects, says = [], []
    for line in path.read_text().splitlines():
        if m := re.match(r"# expect: (?:(\S+):)?(\d+) (\S+)$", line):
            expects.append((m[1] or path.name, int(m[2]), m[3]))
        elif line.startswith("# says: "):
            says.append(line.removeprefix("# says: "))
    return expects, says


# ------------------------------------------------------------------------------ bad recipes
def test_enough_bad_recipes():
    assert len(list(BAD.glob("*.yaml"))) >= 18


@pytest.mark.parametrize("path", sorted(BAD.glob("*.yaml")), ids=lambda p: p.stem)
def test_bad_recipe_message(path: Path):
    expects, says = expectations(path)
    assert expects, f"{path.name} has no '# expect:' line"
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    for file, line, key in expects:
        assert f"{file}:{line}:" in message
        if key != "-":
            assert f"{file}:{line}: {key}:" in message
    for text in says:
        assert text.lower() in message.lower()
    assert "Traceback" not in message and "pydantic" not in message and "For further information" not in message
    lines = message.splitlines()
    assert len(lines) == (1 if len(expects) == 1 else len(expects) + 1)
    assert all(line.strip() and len(line) < 600 for line in lines)


def test_missing_file(tmp_path: Path):
    with pytest.raises(RecipeError, match=r"nope\.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_bad_path_in_base_points_at_base(tmp_path: Path):
    write(tmp_path / "common/base.yaml", MINIMAL.replace("duration: 20 steps", "duration: 20 weeks"))
    child = write(tmp_path / "exp/child.yaml", "base: ../common/base.yaml\nname: child\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    assert "base.yaml:10: training.duration:" in str(info.value)


# ---------------------------------------------------------------------------- good recipes
def test_minimal_recipe(tmp_path: Path):
    recipe = load_recipe(write(tmp_path / "r.yaml", MINIMAL))
    assert isinstance(recipe, Recipe)
    assert recipe.training.duration.unit == "steps" and recipe.training.duration.value == 20
    assert recipe.method.kind == "lora" and recipe.method.lora.r == 16


def test_exponent_floats_are_numbers(tmp_path: Path):
    recipe = load_recipe(write(tmp_path / "r.yaml", MINIMAL + "  learning_rate: 1e-4\n"))
    assert recipe.training.learning_rate == 1e-4
    assert "learning_rate: 0.0001" in dump_resolved(recipe)


def test_base_composition(tmp_path: Path):
    write(tmp_path / "base.yaml", MINIMAL + """\
  learning_rate: 2e-4
method:
  kind: lora
  lora: {r: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, o_proj]}
""")
    child = write(tmp_path / "child.yaml", """\
        base: base.yaml
        name: child
        method:
          lora: {r: 8, targets: [q_proj, v_proj]}
        data:
          sources:
            - {path: law.jsonl, format: chat}
            - {path: culture.jsonl, format: chat, weight: 0.5}
        training:
          learning_rate: 1e-4
        """)
    loaded = load_recipe_with_sources(child)
    recipe = loaded.recipe
    assert loaded.files == [child, tmp_path / "base.yaml"] and loaded.overrides == []
    assert recipe.name == "child"
    assert (recipe.method.lora.r, recipe.method.lora.alpha) == (8, 32)  # nested keys merge
    assert recipe.method.lora.targets == ["q_proj", "v_proj"]  # lists replace
    assert [s.path for s in recipe.data.sources] == [str(tmp_path / "law.jsonl"), str(tmp_path / "culture.jsonl")]
    assert recipe.data.sources[1].weight == 0.5 and recipe.data.max_length == 128
    assert (recipe.training.learning_rate, recipe.training.global_batch_size) == (1e-4, 8)


def test_base_chain_resolves_paths_per_file(tmp_path: Path):
    write(tmp_path / "common/root.yaml", MINIMAL)
    write(tmp_path / "common/sft.yaml", "base: root.yaml\nmodel: {chat_template: templates/fr.jinja}\n")
    child = write(tmp_path / "exp/run.yaml", "base: ../common/sft.yaml\nname: run\n")
    loaded = load_recipe_with_sources(child)
    assert [p.name for p in loaded.files] == ["run.yaml", "sft.yaml", "root.yaml"]
    assert loaded.recipe.data.sources[0].path == str(tmp_path / "common/data.jsonl")
    assert loaded.recipe.model.chat_template == str(tmp_path / "common/templates/fr.jinja")
    assert loaded.recipe.model.name_or_path == str(tmp_path / "common/tiny-model")


def test_relative_path_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    recipe_file = write(tmp_path / "recipes/r.yaml", """\
        name: t
        task: sft
        model: {name_or_path: Qwen/Qwen2.5-0.5B, tokenizer: ../tokenizers/fr, chat_template: chatml}
        data:
          sources:
            - {path: data/a.jsonl, format: chat}
            - {path: $DSDIR/corpus/b.jsonl, format: chat}
            - {path: /abs/c.jsonl, format: chat}
        training: {global_batch_size: 8, duration: 20 steps}
        """)
    recipe = load_recipe(recipe_file)
    assert recipe.model.name_or_path == "Qwen/Qwen2.5-0.5B"  # a hub id, not a path
    assert recipe.model.tokenizer == str(tmp_path / "tokenizers/fr")
    assert recipe.model.chat_template == "chatml"  # a named template
    assert [s.path for s in recipe.data.sources] == [
        str(tmp_path / "recipes/data/a.jsonl"), "$DSDIR/corpus/b.jsonl", "/abs/c.jsonl"]
    assert recipe.model.mirrors == ["$DSDIR/HuggingFace_Models"]  # env vars stay literal

    monkeypatch.chdir(tmp_path)  # paths given with --set are relative to the CWD
    recipe = load_recipe(recipe_file, ["data.sources.0.path=extra.jsonl", "model.name_or_path=./my-model"])
    assert recipe.data.sources[0].path == str(tmp_path / "extra.jsonl")
    assert recipe.model.name_or_path == str(tmp_path / "my-model")


# -------------------------------------------------------------------------------- overrides
def test_overrides(tmp_path: Path):
    path = write(tmp_path / "r.yaml", MINIMAL)
    loaded = load_recipe_with_sources(path, [
        "training.learning_rate=1e-4",
        "training.gradient_checkpointing=true",
        "method.lora.targets=[q_proj,v_proj]",
        "method.lora.r=8",
        "data.sources.0.weight=2",
        "training.duration=3 epochs",
        "name=t2",
    ])
    recipe = loaded.recipe
    assert recipe.training.learning_rate == 1e-4 and recipe.training.gradient_checkpointing is True
    assert recipe.method.lora.targets == ["q_proj", "v_proj"] and recipe.method.lora.r == 8
    assert recipe.data.sources[0].weight == 2 and recipe.data.sources[0].format == "chat"
    assert str(recipe.training.duration) == "3 epochs" and recipe.name == "t2"
    assert loaded.overrides[0] == "training.learning_rate=1e-4"


def test_override_replaces_list(tmp_path: Path):
    recipe = load_recipe(write(tmp_path / "r.yaml", MINIMAL), ["data.sources=[{path: a.txt, format: text}]"])
    assert [(s.path, s.format) for s in recipe.data.sources] == [(str(Path.cwd() / "a.txt"), "text")]


@pytest.mark.parametrize("override, says", [
    ("training.globl_batch_size=8",
     "--set training.globl_batch_size=8: training.globl_batch_size: unknown key 'globl_batch_size'. "
     "Did you mean 'global_batch_size'?"),
    ("modle.name_or_path=x", "--set modle.name_or_path=x: modle: unknown key 'modle'. Did you mean 'model'?"),
    ("data.sources.3.weight=2", "data.sources has 1 item(s); index 3 is out of range"),
    ("data.sources.first.weight=2", "data.sources is a list: select an item by its index, e.g. data.sources.0"),
    ("training.seed=1", "unknown key 'seed'. Did you mean 'seed' (a top-level key)?"),
    ("training.learning_rate.max=1", "training.learning_rate is a single value, not a section"),
    ("training.duration.unit=steps", "training.duration is '20 steps', not a mapping"),
    ("training.learning_rate", "expected --set path.to.key=value"),
    ("training.micro_batch_size=0", "--set training.micro_batch_size=0: training.micro_batch_size: must be a positive"),
    ("training.duration=100", "--set training.duration=100: training.duration: duration 100 has no unit"),
    ("model.dtype=bf16", "--set model.dtype=bf16: model.dtype: invalid value 'bf16'"),
])
def test_override_errors(tmp_path: Path, override: str, says: str):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r.yaml", MINIMAL), [override])
    assert says in str(info.value)


def test_override_errors_are_reported_together(tmp_path: Path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r.yaml", MINIMAL), ["training.lr=1e-4", "seed=1", "metod.kind=full"])
    lines = str(info.value).splitlines()
    assert "2 problems" in lines[0] and len(lines) == 3
    assert "--set training.lr=1e-4" in lines[1] and "--set metod.kind=full" in lines[2]


def test_merge_keys_point_at_the_anchor(tmp_path: Path):
    path = write(tmp_path / "r.yaml", """\
        name: t
        task: sft
        model: {name_or_path: ./tiny-model}
        data:
          sources:
            - &chat {path: a.jsonl, format: chat, weight: -1}
            - {<<: *chat, path: b.jsonl}
        training: {global_batch_size: 8, duration: 20 steps}
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = str(info.value).splitlines()
    assert "2 problems" in lines[0]
    assert "r.yaml:6: data.sources.0.weight: source weight must be > 0" in lines[1]
    assert "r.yaml:6: data.sources.1.weight: source weight must be > 0" in lines[2]  # written at the anchor


# ------------------------------------------------------------------------------- world size
def test_world_size(tmp_path: Path):
    path = write(tmp_path / "r.yaml", MINIMAL.replace("global_batch_size: 8", "global_batch_size: 16"))
    assert load_recipe(path, world_size=1).training.gradient_accumulation(1) == 8
    assert load_recipe(path, world_size=4).training.gradient_accumulation(4) == 2
    with pytest.raises(RecipeError) as info:
        load_recipe(path, world_size=3)
    assert "r.yaml:8: training.global_batch_size:" in str(info.value)
    assert "World sizes that work with these sizes: [1, 2, 4, 8]" in str(info.value)


# ----------------------------------------------------------------------------- resolved dump
def test_dump_resolved_round_trip(tmp_path: Path):
    write(tmp_path / "base.yaml", MINIMAL)
    child = write(tmp_path / "child.yaml", "base: base.yaml\nname: child\nmethod: {kind: qlora}\n")
    loaded = load_recipe_with_sources(child, ["training.learning_rate=1e-4"])
    text = dump_resolved(loaded)
    assert text.startswith("# Resolved by affinage")
    assert str(child) in text and str(tmp_path / "base.yaml") in text
    assert "# --set training.learning_rate=1e-4" in text
    assert "duration: 20 steps" in text and "$DSDIR/HuggingFace_Models" in text
    body = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert body == list(Recipe.model_fields)  # schema order, every section

    out = write_resolved(loaded, tmp_path / "run/resolved.yaml")
    again = load_recipe(out)
    assert again == loaded.recipe
    assert dump_resolved(again).split("\n", 1)[1] == text.split("\n", 3)[3]  # same body


# ------------------------------------------------------------------------------------ dicts
def test_load_recipe_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(MINIMAL)
    recipe = load_recipe_dict(data, ["training.micro_batch_size=4"])
    assert recipe.training.micro_batch_size == 4 and data["training"]["micro_batch_size"] == 2
    assert recipe.data.sources[0].path == os.path.join(tmp_path, "data.jsonl")
    data["training"]["global_batch_size"] = "eight"
    with pytest.raises(RecipeError, match=r"^<recipe dict>: training.global_batch_size: expected a whole number"):
        load_recipe_dict(data)


def test_a_local_model_folder_without_dot_slash_is_recorded_absolute(tmp_path, monkeypatch):
    """`--set model.name_or_path=runs/x/final` from one folder must not mean another folder later (issue 16)."""
    from affinage.recipe.loader import load_recipe_dict

    (tmp_path / "runs" / "x" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    base = {"name": "r", "task": "cpt", "model": {"name_or_path": "org/name"},
            "data": {"sources": [{"path": "d.jsonl"}]}, "training": {"global_batch_size": 2, "duration": "2 steps"}}
    recipe = load_recipe_dict(base, overrides=["model.name_or_path=runs/x/final"])
    assert recipe.model.name_or_path == str(tmp_path / "runs" / "x" / "final")
    assert load_recipe_dict(base).model.name_or_path == "org/name"  # a hub id stays an id
