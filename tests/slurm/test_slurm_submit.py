"""Submission without a cluster (--dry-run): resolved recipes, scripts, sweeps, pipelines, refusals."""

from __future__ import annotations

import subprocess

import pytest
from slurm_helpers import write_recipe

from affinage.recipe.loader import RecipeError, load_recipe
from affinage.slurm.cli import main as slurm_main
from affinage.slurm.profiles import ProfileError
from affinage.slurm.render import Stage
from affinage.slurm.submit import SubmitError, pipeline_stages, submit, sweep_points


def test_dry_run_writes_resolved_recipe_and_script(tmp_path, recipe):
    run = tmp_path / "runs" / "demo"
    result = submit(recipe, "jean-zay-h100", account="abc", nodes=2, run_dir=run, dry_run=True,
                    overrides=["training.learning_rate=1e-4"])
    assert result.job_ids == {} and result.run_dirs == [run]
    assert result.commands == [["sbatch", "--parsable", "train.sbatch"]]
    resolved = load_recipe(run / "recipe.yaml")
    original = load_recipe(recipe, ["training.learning_rate=1e-4"])
    assert resolved.training == original.training and resolved.model == original.model
    assert resolved.run_dir() == str(run)
    script = result.scripts["train"].read_text()
    assert result.scripts["train"] == run / "slurm" / "train.sbatch"
    assert f"  {run}\n" in script and "--nproc_per_node=4" in script
    assert not (run / "slurm" / "jobs.jsonl").exists()  # nothing submitted, nothing recorded


def test_later_recipe_edits_do_not_reach_the_job(tmp_path, recipe):
    run = tmp_path / "run"
    submit(recipe, "local", run_dir=run, dry_run=True)
    recipe.write_text(recipe.read_text().replace("learning_rate: 2e-4", "learning_rate: 9e-4"))
    assert load_recipe(run / "recipe.yaml").training.learning_rate == 2e-4


def test_sweep_dirs_arrays_and_aftercorr(tmp_path, recipe):
    after = Stage("after", ("-c", "pass", "{run_dir}"))
    result = submit(recipe, "local", run_dir=tmp_path / "run", dry_run=True,
                    sweep=["training.learning_rate=1e-4,3e-4"], pipeline=["train", after])
    assert result.run_dirs == [tmp_path / "run" / "sweep-0", tmp_path / "run" / "sweep-1"]
    assert [load_recipe(d / "recipe.yaml").training.learning_rate for d in result.run_dirs] == [1e-4, 3e-4]
    assert result.commands[1] == ["sbatch", "--parsable", "--dependency=aftercorr:<train job id>", "after.sbatch"]
    script = result.scripts["train"].read_text()
    assert "#SBATCH --array=0-1" in script and "# 1: training.learning_rate=3e-4" in script


def test_sweep_points():
    assert sweep_points([]) == [[]]
    assert sweep_points(["a.b=1,2", "c=[x,y],all"]) == [
        ["a.b=1", "c=[x,y]"], ["a.b=1", "c=all"], ["a.b=2", "c=[x,y]"], ["a.b=2", "c=all"]]
    with pytest.raises(SubmitError, match="write --sweep path.to.key=value1,value2"):
        sweep_points(["training.learning_rate"])
    with pytest.raises(SubmitError):
        sweep_points(["x=1,,2"])


def test_pipeline_names_need_their_command():
    assert [s.name for s in pipeline_stages(["train"])] == ["train"]
    with pytest.raises(SubmitError, match=r"pipeline stage 'foo': unknown stage. Valid choices: .*train"):
        pipeline_stages(["foo"])
    with pytest.raises(SubmitError, match="each stage may appear once"):
        pipeline_stages(["train", "train"])


def test_every_stage_runs_a_command_the_cli_has():
    """submit names the CLI's commands without importing it (cli imports submit): checked here instead."""
    import argparse

    from affinage.cli import build_parser
    from affinage.slurm.submit import BUILTIN_STAGES

    (commands,) = [a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, stage in BUILTIN_STAGES.items():
        assert stage.args[:3] == ("-m", "affinage.cli", name) and name in commands


def test_refusals_happen_before_anything_is_written(tmp_path, recipe):
    run = tmp_path / "run"
    with pytest.raises(ProfileError, match="Valid choices"):
        submit(recipe, "jean-zay-a100", account="abc", qos="qos_gpu_h100-t4", run_dir=run, dry_run=True)
    with pytest.raises(ProfileError, match="cannot go into an #SBATCH line"):
        submit(recipe, "jean-zay-h100", account="$(touch /tmp/affinage-pwned)", run_dir=run, dry_run=True)
    with pytest.raises(RecipeError, match="cannot be split over 12 processes"):
        submit(recipe, "jean-zay-h100", account="abc", nodes=3, run_dir=run, dry_run=True)
    with pytest.raises(RecipeError, match="must be letters, digits"):
        submit(recipe, "local", overrides=["name=$(touch /tmp/affinage-pwned)"], run_dir=run, dry_run=True)
    with pytest.raises(SubmitError, match="more than half of --time 900 s"):
        submit(recipe, "jean-zay-h100", account="abc", time="00:15:00", qos="dev", run_dir=run, dry_run=True)
    assert not run.exists()


def test_cli_dry_run_and_errors(tmp_path, recipe, capsys):
    run = tmp_path / "cli-run"
    assert slurm_main(["submit", str(recipe), "--cluster", "local", "--run-dir", str(run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"train     {run}/slurm/train.sbatch  job not submitted (--dry-run)" in out
    assert "sbatch --parsable train.sbatch" in out
    assert slurm_main(["submit", str(recipe), "--cluster", "jean-zay-h100", "--account", "abc",
                       "--time", "30:00:00", "--dry-run"]) == 2
    assert "use --qos qos_gpu_h100-t4" in capsys.readouterr().err
    assert slurm_main(["status", str(run)]) == 0
    assert "no jobs recorded" in capsys.readouterr().out


@pytest.mark.parametrize("profile", ["jean-zay-h100", "jean-zay-a100", "jean-zay-v100", "lumi-g", "local"])
def test_every_profile_renders_valid_bash(tmp_path, profile):
    recipe = write_recipe(tmp_path, extra="")
    result = submit(recipe, profile, account="465000123" if profile == "lumi-g" else "abc" if profile != "local" else None,
                    run_dir=tmp_path / "run", dry_run=True, sweep=["seed=1,2"])
    for script in result.scripts.values():
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
