"""The shipped 7B recipes, staged, pass `affinage check-offline` (plan + smoke with no network at all).

Models come from ../shared the way a Jean Zay user finds them ($DSDIR mirror, config and tokenizer
only: smoke builds a tiny model of the same architecture), staged with `affinage stage`.
"""

from __future__ import annotations

import json

import pytest
from testlib import REPO, needs_shared

from cli.test_recipes_smoke import REAL_RECIPES, cluster_env  # noqa: F401 (the fixture)

OFFLINE_RECIPES = [pytest.param(r[0], id=r[0], marks=() if i == 0 else pytest.mark.slow) for i, r in enumerate(REAL_RECIPES)]


@needs_shared
@pytest.mark.parametrize("rel", OFFLINE_RECIPES)
def test_staged_real_recipe_passes_check_offline(rel, cluster_env, monkeypatch, tmp_path):  # noqa: F811
    for k, v in cluster_env.items():
        monkeypatch.setenv(k, v)
    from affinage.cli import main

    out = tmp_path / "staged"
    assert main(["stage", str(REPO / "recipes" / rel), "--to", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert any(f["key"] == "model.name_or_path" and f["path"].endswith("/config.json") for f in manifest["files"])
    assert any(f["key"] == "data.sources.0.path" for f in manifest["files"])
    monkeypatch.delenv("DSDIR")  # the staged recipe needs neither the mirror nor the data under the old $WORK
    monkeypatch.setenv("WORK", str(tmp_path / "empty-work"))  # output.dir still names $WORK, as on the cluster
    assert main(["check-offline", str(out / "recipe.yaml"), "--steps", "2"]) == 0
