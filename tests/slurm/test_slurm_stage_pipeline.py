"""`submit --pipeline stage,check-offline,train`: staging runs where the network is, or is refused."""

from __future__ import annotations

import pytest

from affinage.resources import resource_dir
from affinage.slurm.submit import SubmitError, submit


def test_stage_runs_on_prepost_before_the_check_and_training(tmp_path, recipe):
    run = tmp_path / "run"
    result = submit(recipe, "jean-zay-h100", account="abc", pipeline=["stage", "check-offline", "train"], run_dir=run, dry_run=True)
    assert list(result.scripts) == ["stage", "check-offline", "train"]
    stage = result.scripts["stage"].read_text()
    assert "#SBATCH --partition=prepost" in stage
    assert 'STAGE_ARGS=(-m affinage.cli stage "$RUN_DIR"/recipe.yaml --to "$RUN_DIR"/staged --download --write-recipe "$RUN_DIR"/recipe.yaml)' in stage
    check = result.scripts["check-offline"].read_text()
    assert 'check-offline "$RUN_DIR"/recipe.yaml' in check
    deps = [c for c in result.commands if any(a.startswith("--dependency") for a in c)]
    assert [c[-1] for c in deps] == ["check-offline.sbatch", "train.sbatch"]


def test_stage_is_refused_where_the_nodes_have_no_network(tmp_path, recipe):
    text = (resource_dir("clusters") / "local.yaml").read_text()
    profile = tmp_path / "closed.yaml"
    profile.write_text(text.replace("name: local", "name: closed").replace("  internet: true", "  internet: false\n  partition: compute"))
    with pytest.raises(SubmitError, match=r"stage 'stage' needs the network, and profile closed runs it on partition compute"):
        submit(recipe, str(profile), pipeline=["stage", "train"], run_dir=tmp_path / "run", dry_run=True)
    assert not (tmp_path / "run").exists()
    # the other stages still go: staging was done by hand on a login node
    submit(recipe, str(profile), pipeline=["check-offline", "train"], run_dir=tmp_path / "run", dry_run=True)
