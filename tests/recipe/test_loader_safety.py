"""Hostile YAML: alias bombs, deep nesting, self-referencing anchors and huge files are refused at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from affinage.recipe import RecipeError, load_recipe
from affinage.recipe.loader import MAX_DEPTH, MAX_NODES, MAX_RECIPE_BYTES


def _laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _refused(tmp_path: Path, text: str, says: str) -> RecipeError:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert time.perf_counter() - t0 < 0.5, "a hostile recipe must be refused in well under a second"
    assert says in str(e.value)
    assert str(e.value).startswith("bad.yaml:") or "/bad.yaml:" in str(e.value)
    return e.value


def test_billion_laughs_refused_fast(tmp_path):
    err = _refused(tmp_path, _laughs(), f"expand to more than {MAX_NODES:,} values")
    line = int(str(err).split(":")[1])
    assert 2 <= line <= 9  # the line of the alias list that crosses the limit


def test_small_aliases_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(
        "defaults: &src {format: chat, weight: 1.0}\n"  # unknown top-level key, but aliases resolve first
        "name: t\n", encoding="utf-8")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "unknown key 'defaults'" in str(e.value)  # reached validation: the alias was fine


def test_deep_nesting_refused(tmp_path):
    err = _refused(tmp_path, "name: " + "[" * 5000 + "]" * 5000 + "\n", f"nested more than {MAX_DEPTH} levels")
    assert "RecursionError" not in str(err)


def test_deep_block_nesting_refused(tmp_path):
    text = "".join("  " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5)) + "  " * (MAX_DEPTH + 5) + "v: 1\n"
    _refused(tmp_path, text, "nested more than")


def test_alias_loop_refused(tmp_path):
    _refused(tmp_path, "a: &x\n  - 1\n  - *x\n", "refers to the mapping or list that contains it")


def test_huge_file_refused(tmp_path):
    _refused(tmp_path, "# " + "x" * MAX_RECIPE_BYTES + "\nname: t\n", "a recipe is at most")


def test_alias_bomb_in_set_override(tmp_path):
    from testlib import REPO

    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + [f"&{c} [" + ", ".join([f"*{p}"] * 10) + "]"
                                                                     for p, c in zip("abcd", "bcde")]) + "]"
    with pytest.raises(RecipeError) as e:
        load_recipe(REPO / "recipes/demo/full/cpt.yaml", overrides=[f"training.report_to={bomb}"])
    assert str(e.value).startswith("--set training.report_to=")
    assert "expand to more than" in str(e.value)
