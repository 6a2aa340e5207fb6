"""A training job cut twice by SLURM's time-limit signal ends with the weights of an uninterrupted job.

Both jobs run through `affinage submit --cluster local` on the same allocation shape, so thread
counts (and so float reduction orders) are the same; the comparison is bitwise.
"""

from __future__ import annotations

import json
import subprocess

from slurm_helpers import assert_same_final_weights, last_step, wait_until

from affinage.slurm.status import read_events, run_status, wait_for_job
from affinage.slurm.submit import submit


def test_signal_requeue_resume_twice_equals_uninterrupted(tmp_path, local_cluster, tiny_llama_dir, demo_data):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"""name: tiny-cpt-requeue
task: cpt
seed: 11
model: {{name_or_path: {tiny_llama_dir}, dtype: float32}}
method: {{kind: full}}
data: {{sources: [{{path: {demo_data / 'histoire.jsonl'}, format: text, max_records: 40}}], max_length: 64}}
training: {{global_batch_size: 4, micro_batch_size: 2, duration: 150 steps, learning_rate: 1e-3, report_to: [none]}}
""",
        encoding="utf-8",
    )
    ref_run, cut_run = tmp_path / "ref", tmp_path / "cut"
    ref = submit(recipe, "local", run_dir=ref_run, time="00:10:00")
    cut = submit(recipe, "local", run_dir=cut_run, time="00:10:00")
    job = cut.job_ids["train"]

    cut_at = []
    for restart in (0, 1):
        floor = cut_at[-1] if cut_at else 0
        wait_until(lambda: last_step(cut_run) >= floor + 10, 300, f"training steps after restart {restart}")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        wait_until(lambda: sum(e["event"] == "requeued" for e in read_events(cut_run)) > restart, 300, "the requeue")
        cut_at.append(last_step(cut_run))

    wait_for_job(job, timeout=600)
    wait_for_job(ref.job_ids["train"], timeout=600)

    requeues = [e for e in read_events(cut_run) if e["event"] == "requeued"]
    starts = [e["restart_count"] for e in read_events(cut_run) if e["event"] == "started"]
    assert len(requeues) == 2 and starts == [0, 1, 2]
    assert all(0 < s < 150 for s in cut_at), cut_at
    summary = json.loads((cut_run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 150 and summary["resumed_from"]
    assert summary["slurm"]["restart_count"] == 2 and summary["slurm"]["job_id"] == job
    assert run_status(cut_run)[0]["restarts"] == 2

    assert_same_final_weights(ref_run, cut_run, "model.safetensors", f"after two requeues (cut at steps {cut_at})")
