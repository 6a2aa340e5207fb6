"""A training chain of two-minute jobs with a slow save and no USR1 warning at all (``--grace 0``).

Every job must stop on its own clock (the job's end time from SLURM, its measured step and save
times), leave a complete checkpoint, requeue itself, and the whole chain must end with the weights
of an uninterrupted run, bitwise. The save sleeps ``SAVE_SLEEP`` seconds before its COMPLETE marker
(``AFFINAGE_TEST_SAVE_SLEEP``, a test-only hook), so a stop that did not leave room for it would be
killed mid-save and the next job would resume from an older checkpoint (and the test would see it).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest
from slurm_helpers import assert_same_final_weights

from affinage.run import RunDir
from affinage.slurm.status import read_events, wait_for_job
from affinage.slurm.submit import submit
from affinage.train.walltime import SAVE_SLEEP_ENV, read_timing

SAVE_SLEEP = 4  # seconds: slower than the rest of a tiny checkpoint by far
STEPS = 3000  # more than one two-minute job even on idle cores (0.077 s/step idle, 0.14 s loaded; start-up 25-40 s)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("AFFINAGE_SLOW"), reason="slow (3+ two-minute SLURM jobs): set AFFINAGE_SLOW=1 to run")
def test_two_minute_jobs_without_signal_stop_on_their_clock_and_end_bitwise_equal(tmp_path, local_cluster, tiny_llama_dir, demo_data, monkeypatch):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"""name: tiny-cpt-walltime
task: cpt
seed: 11
model: {{name_or_path: {tiny_llama_dir}, dtype: float32}}
method: {{kind: full}}
data: {{sources: [{{path: {demo_data / 'histoire.jsonl'}, format: text, max_records: 40}}], max_length: 64}}
training: {{global_batch_size: 4, micro_batch_size: 2, duration: {STEPS} steps, learning_rate: 1e-3, report_to: [none], exit_margin_s: 20}}
""",
        encoding="utf-8",
    )
    monkeypatch.setenv(SAVE_SLEEP_ENV, str(SAVE_SLEEP))  # sbatch passes the environment on
    ref_run, cut_run = tmp_path / "ref", tmp_path / "cut"
    ref = submit(recipe, "local", run_dir=ref_run, time="00:10:00")
    cut = submit(recipe, "local", run_dir=cut_run, time="00:02:00", grace_s=0)
    script = cut.scripts["train"].read_text()
    assert "--signal" not in script and "--requeue" in script

    job = cut.job_ids["train"]
    wait_for_job(job, timeout=900)
    wait_for_job(ref.job_ids["train"], timeout=600)

    events = read_events(cut_run)
    requeues = [e for e in events if e["event"] == "requeued"]
    sessions = read_timing(RunDir(cut_run))
    assert len(requeues) >= 1, f"the chain never hit its time limit ({len(sessions)} sessions)"
    assert len(sessions) == len(requeues) + 1
    logs = "".join(p.read_text(errors="replace") for p in (cut_run / "slurm").glob("train-*.out"))
    assert "affinage: USR1" not in logs  # no warning signal was ever delivered

    left_at = {int(e["restart_count"]): datetime.fromisoformat(e["time"]).timestamp() for e in requeues}
    for before, after in zip(sessions, sessions[1:]):
        # the whole job (summary, provenance, process exit, requeue) ended before its time limit
        assert left_at[before["restart_count"]] <= before["end_time"] + 1, (before, left_at)
        # stopped on its own clock, with the save and the exit inside the job's time
        assert before["stopped_at"] and before["end_source"] in ("SLURM_JOB_END_TIME", f"squeue -h -j {job} -o %e")
        assert before["ended"] <= before["end_time"], before
        assert before["save_seconds_max"] >= SAVE_SLEEP
        # the next job resumed from the checkpoint this one wrote at its stop: it was complete
        assert after["start_step"] == before["stopped_at"], (before, after)
    assert sessions[-1]["end_step"] == STEPS and sessions[-1]["stopped_at"] is None

    summary = json.loads((cut_run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == STEPS and summary["slurm"]["restart_count"] == len(requeues)

    assert_same_final_weights(ref_run, cut_run, "model.safetensors", f"after {len(requeues)} clock stops")

    lines = [
        f"job {s.get('job_id')} restart {s['restart_count']}: steps {s['start_step']}->{s.get('end_step')}, "
        f"step {s['step_seconds']:.4f} s, save first {s['save_seconds_first']} s max {s['save_seconds_max']} s, "
        f"interval {s['save_interval_steps']} steps (lost work <= {s['lost_work_s']} s), "
        f"start-up {s.get('first_step_after_s')} s, exit margin {s['exit_margin_s']:.1f} s, "
        f"stopped at {s['stopped_at']}, training ended {s['end_time'] - s['ended']:.1f} s before the limit"
        for s in sessions
    ]
    Path(os.environ.get("AFFINAGE_WALLTIME_REPORT", tmp_path / "walltime.txt")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
