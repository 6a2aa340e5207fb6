"""Every numeric recipe key is bounded: values no run can use are refused where the recipe is read (file:line)."""

from __future__ import annotations

import pytest

from affinage.recipe import RecipeError, load_recipe
from testlib import REPO

DEMO = REPO / "recipes" / "demo" / "full" / "cpt.yaml"

REFUSED = [
    ("seed=-1", "seed must be in [0, 2**32-1]"),
    ("seed=4294967296", "seed must be in [0, 2**32-1]"),
    ("training.save_every=0", "save_every must be >= 1"),
    ("training.save_every=-5", "save_every must be >= 1"),
    ("training.eval_every=0", "eval_every must be >= 1"),
    ("training.max_grad_norm=-0.5", "max_grad_norm must be >= 0"),
    ("training.warmup_steps=-10", "warmup_steps must be >= 0"),
    ("training.weight_decay=-0.1", "weight_decay must be >= 0"),
    ("training.weight_decay=.nan", "finite number"),
    ("training.learning_rate=.inf", "finite number"),
    ("training.adam_beta1=1.5", "adam_beta1 must be in [0, 1)"),
    ("training.global_batch_size=10000000", "global_batch_size must be <= 1,048,576"),
    ("training.duration=5000000000 steps", "beyond any run"),
    ("training.duration=100000 epochs", "beyond any run"),
    ("data.max_length=10000000", "max_length must be <= 1,048,576"),
    ("data.heldout_max=0", "heldout_max must be >= 1"),
    ("data.filters.min_chars=-1", "min_chars must be >= 0"),
    ("data.filters.max_tokens=0", "max_tokens must be >= 1"),
    ("data.sources.0.weight=1e9", "source weight must be <= 1,000"),
    ("output.dir=runs/{nmae}", "unknown placeholder {nmae}"),
    ("output.dir=runs/{}", "unknown placeholder {}"),
    ("output.dir=runs/{name", "write {{ and }} for literal braces"),
    ("eval={seed: -3}", "seed must be in"),
]


@pytest.mark.parametrize("override,says", REFUSED, ids=[o for o, _ in REFUSED])
def test_out_of_range_refused_at_the_set(override, says):
    with pytest.raises(RecipeError) as e:
        load_recipe(DEMO, overrides=[override])
    assert str(e.value).startswith(f"--set {override}: ")
    assert says in str(e.value)


def test_bound_located_at_the_file_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = DEMO.read_text().replace("  save_every: 50", "  save_every: 0")
    bad.write_text(text.replace("../", str(DEMO.parent.parent) + "/"))
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "save_every: 0" in l)
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert f"bad.yaml:{line}: training.save_every: " in str(e.value)


def test_valid_edges_accepted():
    r = load_recipe(DEMO, overrides=["seed=0", "training.max_grad_norm=0", "training.warmup_steps=0",
                                     "output.dir=runs/{name}-{{literal}}"])
    assert r.seed == 0 and r.training.max_grad_norm == 0.0
    assert r.run_dir() == "runs/demo-cpt-{literal}"
    assert load_recipe(DEMO, overrides=[f"seed={2**32 - 1}"]).seed == 2**32 - 1
