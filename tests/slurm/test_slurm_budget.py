"""`affinage plan --cluster`: the job chain the walltime rule gives, from a measured or a FLOPs step time."""

from __future__ import annotations

import json
import math

import pytest

from affinage.slurm.budget import chain_estimate, format_chain, training_flops_per_step
from affinage.train.walltime import SAVE_SAFETY


def test_chain_estimate_counts_jobs_lost_time_and_gpu_hours():
    e = chain_estimate(steps=10_000, step_seconds=2.0, save_seconds=60.0, job_seconds=20 * 3600, world_size=8,
                       max_lost_s=1800, save_every=None, exit_margin_s=60, startup_seconds=300, budget_hours=1000)
    assert e.save_interval == 870  # (1800 - 60) / 2
    training = 20 * 3600 - 300 - 2.0 - SAVE_SAFETY * 60 - 60
    assert e.steps_per_job == math.floor(training / (2.0 + 60 / 870))
    assert e.jobs == math.ceil(10_000 / e.steps_per_job) == 1
    assert e.wall_seconds == pytest.approx(300 + 10_000 * (2.0 + 60 / 870) + 60)
    assert e.gpu_hours == pytest.approx(e.wall_seconds * 8 / 3600)
    assert e.fits_budget is True
    long = chain_estimate(steps=100_000, step_seconds=2.0, save_seconds=60.0, job_seconds=20 * 3600, world_size=8,
                          max_lost_s=1800, save_every=None, exit_margin_s=60, startup_seconds=300, budget_hours=100)
    assert long.jobs == math.ceil(100_000 / long.steps_per_job) == 3
    assert long.lost_per_requeue_s == pytest.approx(20 * 3600 - long.steps_per_job * 2.0)
    assert long.fits_budget is False
    text = format_chain(long, "jean-zay-h100")
    assert "3 (the first and 2 requeue(s))" in text and "does NOT fit" in text


def test_a_job_too_short_for_a_save_is_reported():
    e = chain_estimate(steps=10, step_seconds=10, save_seconds=600, job_seconds=600, world_size=1, max_lost_s=1800,
                       save_every=None, exit_margin_s=60, startup_seconds=60)
    assert e.steps_per_job == 0 and e.jobs == 0 and "longer --time" in e.notes[0]


def test_flops_per_step():
    assert training_flops_per_step(7e9, True, 1000) == 6 * 7e9 * 1000
    assert training_flops_per_step(7e9, False, 1000) == 4 * 7e9 * 1000


def test_plan_cluster_uses_a_previous_runs_timing(tmp_path, tiny_llama_dir, demo_data, capsys):
    from affinage.cli import main

    recipe = tmp_path / "r.yaml"
    run = tmp_path / "run"
    recipe.write_text(
        f"""name: tiny-plan
task: cpt
model: {{name_or_path: {tiny_llama_dir}, dtype: float32}}
method: {{kind: full}}
data: {{sources: [{{path: {demo_data / 'histoire.jsonl'}, format: text}}], max_length: 64}}
training: {{global_batch_size: 4, micro_batch_size: 1, duration: 100000 steps, report_to: [none]}}
output: {{dir: {run}}}
""",
        encoding="utf-8",
    )
    # no measurement and no GPU kind on the local profile: a clear error
    assert main(["plan", str(recipe), "--cluster", "local", "--time", "00:30:00"]) == 2
    assert "gpu_kind" in capsys.readouterr().err
    run.mkdir()
    (run / "timing.json").write_text(json.dumps({"sessions": [
        {"step_seconds": 0.5, "save_seconds_max": 20.0, "world_size": 1, "first_step_after_s": 40.0}]}))
    code = main(["plan", str(recipe), "--cluster", "local", "--time", "00:30:00", "--budget-hours", "20", "--json"])
    jobs = json.loads(capsys.readouterr().out)["jobs"]
    assert code == 0 and jobs["step_seconds"] == 0.5 and jobs["save_seconds"] == 20.0 and jobs["startup_seconds"] == 40.0
    assert jobs["jobs"] == math.ceil(100_000 / jobs["steps_per_job"]) and jobs["fits_budget"] is True
    assert main(["plan", str(recipe), "--cluster", "local", "--time", "00:30:00", "--budget-hours", "1"]) == 4
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "measured in" in out


def test_plan_cluster_falls_back_to_flops_on_a_gpu_profile(tmp_path, tiny_llama_dir, demo_data, capsys):
    from affinage.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""name: tiny-plan-gpu
task: cpt
model: {{name_or_path: {tiny_llama_dir}, dtype: bfloat16}}
method: {{kind: full}}
data: {{sources: [{{path: {demo_data / 'histoire.jsonl'}, format: text}}], max_length: 64}}
training: {{global_batch_size: 4, micro_batch_size: 1, duration: 1000 steps, report_to: [none]}}
output: {{dir: {tmp_path / 'run'}}}
""",
        encoding="utf-8",
    )
    assert main(["plan", str(recipe), "--cluster", "jean-zay-h100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    jobs = plan["jobs"]
    flops = training_flops_per_step(plan["params_total"], True, plan["tokens_per_step"])
    assert jobs["world_size"] == 4 and jobs["step_seconds"] == pytest.approx(flops / (989e12 * 0.35 * 4))
    assert "FLOPs estimate" in jobs["step_source"] and jobs["jobs"] == 1


def test_status_shows_step_and_save_time_lost_time_per_requeue_and_eta(tmp_path):
    from affinage.slurm.status import append_event, format_status, jobs_file, run_status

    run = tmp_path / "run"
    append_event(jobs_file(run), "submitted", stage="train", job_id="999999", trains=True, profile="no-such-profile",
                 run_dirs=[str(run)], labels=[], array=False)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 250, "loss": 2.5}) + "\n")
    (run / "timing.json").write_text(json.dumps({"sessions": [
        {"job_id": "999999", "restart_count": 0, "start_step": 0, "end_step": 200, "stopped_at": 200, "max_steps": 500,
         "ended": 1000.0, "end_time": 1010.0, "first_step_after_s": 25.0, "save_seconds_max": 4.0, "step_seconds": 0.1,
         "save_interval_steps": 100, "save_seconds_used": 4.0},
        {"job_id": "999999", "restart_count": 1, "start_step": 200, "max_steps": 500, "step_seconds": 0.1,
         "save_interval_steps": 100, "save_seconds_used": 4.0}]}))
    (row,) = run_status(run)
    assert row["step_seconds"] == 0.1 and row["save_seconds"] == 4.0
    assert row["lost_per_requeue_s"] == 25.0 + 4.0 + 10.0
    assert row["eta_s"] == pytest.approx(250 * (0.1 + 4.0 / 100) + 39.0)
    text = format_status(run, [row])
    assert "S/STEP" in text and "LOST/REQUEUE" in text and "0.1s" in text and "39s" in text and "74s" in text
