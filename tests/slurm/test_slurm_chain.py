"""DPO on the real local SLURM cluster: a USR1 requeue ends bitwise equal, and an SFT -> DPO chain.

Jobs go through ``affinage submit --cluster local`` on the same allocation shape (one CPU thread per
process), so float reduction orders are the same and the comparisons are bitwise.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from slurm_helpers import assert_same_final_weights, last_step, wait_until

from affinage.slurm.status import read_events, run_status, wait_for_job
from affinage.slurm.submit import submit


def dpo_recipe(path: Path, model: Path, data: Path, *, steps: int, pref: str = "", output: str = "") -> Path:
    path.write_text(
        f"""name: tiny-dpo-requeue
task: dpo
seed: 5
model: {{name_or_path: {model}, dtype: float32}}
method: {{kind: lora, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
preference: {{beta: 0.1{pref}}}
data: {{sources: [{{path: {data}, format: preference, max_records: 32}}], max_length: 128, heldout_fraction: 0.25}}
training: {{global_batch_size: 4, micro_batch_size: 2, duration: {steps} steps, learning_rate: 1e-2, lr_scheduler: constant,
           logging_steps: 1, report_to: [none]}}
{output}""",
        encoding="utf-8",
    )
    return path


def test_dpo_stage_requeued_by_usr1_ends_bitwise_equal_and_reuses_its_reference(tmp_path, local_cluster, tiny_llama_dir, demo_data):
    """USR1 before the time limit: the DPO job checkpoints, requeues under the same id, resumes and
    ends with the adapter of an uninterrupted job; the precomputed reference log-probs are read back,
    not recomputed, by the requeued job."""
    recipe = dpo_recipe(tmp_path / "dpo.yaml", tiny_llama_dir, demo_data / "preferences.jsonl", steps=60,
                        pref=", reference: precomputed")
    ref_run, cut_run = tmp_path / "ref", tmp_path / "cut"
    ref = submit(recipe, "local", run_dir=ref_run, time="00:10:00", pipeline=["dpo"])
    cut = submit(recipe, "local", run_dir=cut_run, time="00:10:00", pipeline=["dpo"])
    job = cut.job_ids["dpo"]
    assert "#SBATCH --signal=B:USR1@30" in cut.scripts["dpo"].read_text()

    wait_until(lambda: last_step(cut_run) >= 8, 240, "DPO training steps")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    wait_until(lambda: any(e["event"] == "requeued" for e in read_events(cut_run)), 120, "the requeue")
    cut_at = last_step(cut_run)
    wait_for_job(job, timeout=300)
    wait_for_job(ref.job_ids["dpo"], timeout=300)

    events = read_events(cut_run)
    assert [e["restart_count"] for e in events if e["event"] == "started"] == [0, 1]
    assert {e["job_id"] for e in events if e["event"] != "submitted"} == {job}  # the requeued job kept its id
    summary = json.loads((cut_run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 60 and summary["resumed_from"]
    assert summary["slurm"]["restart_count"] == 1 and summary["slurm"]["job_id"] == job
    assert 0 < cut_at < 60
    cache = summary["preference"]["reference_cache"]
    assert cache and all(ev["hit"] for ev in cache), cache  # the requeued job read the cached reference log-probs
    assert run_status(cut_run)[0]["restarts"] == 1

    assert_same_final_weights(ref_run, cut_run, "adapter_model.safetensors", f"after a USR1 requeue at step {cut_at}")


@pytest.mark.slow  # five chained SLURM jobs and a requeue: 120 s here
def test_sft_then_dpo_chain_waits_for_the_requeued_sft_and_evaluates(tmp_path, local_cluster, tiny_llama_dir, demo_data):
    """``--pipeline prepare,sft,dpo,eval --from-recipe``: the SFT job is cut by USR1 and requeued; the
    DPO training starts only after its final success, from its merged adapter; eval runs on the DPO run."""
    sft_run, dpo_run = tmp_path / "runs" / "sft", tmp_path / "runs" / "dpo"
    sft = tmp_path / "sft.yaml"
    sft.write_text(
        f"""name: tiny-sft-chain
task: sft
seed: 3
model: {{name_or_path: {tiny_llama_dir}, dtype: float32}}
method: {{kind: lora, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
data: {{sources: [{{path: {demo_data / 'qa_culture.jsonl'}, format: chat, max_records: 32}}], max_length: 96}}
training: {{global_batch_size: 4, micro_batch_size: 2, duration: 60 steps, learning_rate: 1e-2, logging_steps: 1, report_to: [none]}}
output: {{dir: {sft_run}}}
""",
        encoding="utf-8",
    )
    dpo = dpo_recipe(tmp_path / "dpo.yaml", tiny_llama_dir, demo_data / "preferences.jsonl", steps=12,
                     pref=f", from_run: {sft_run}, start: merged", output=f"output: {{dir: {dpo_run}}}\n")
    result = submit(dpo, "local", pipeline=["prepare", "sft", "dpo", "eval"], from_recipe=sft, time="00:10:00")
    ids = result.job_ids
    assert list(ids) == ["sft-prepare", "sft", "prepare", "dpo", "eval"]

    wait_until(lambda: last_step(sft_run) >= 8, 300, "SFT training steps")
    subprocess.run(["scancel", "--batch", "--signal=USR1", ids["sft"]], check=True)
    wait_for_job(ids["eval"], timeout=900)

    sft_events, dpo_events = read_events(sft_run), read_events(dpo_run)
    sft_own = [e for e in sft_events if e.get("stage") == "sft" and e["event"] != "submitted"]
    assert [e["event"] for e in sft_own] == ["started", "requeued", "started", "ended"]
    assert {e["job_id"] for e in sft_own} == {ids["sft"]}
    sft_done = datetime.fromisoformat(sft_own[-1]["time"])
    dpo_started = datetime.fromisoformat(next(e["time"] for e in dpo_events if e["event"] == "started" and e["stage"] == "dpo"))
    assert dpo_started >= sft_done  # afterok waited through the requeue for the final success
    assert json.loads((sft_run / "summary.json").read_text())["slurm"]["restart_count"] == 1

    start = json.loads((dpo_run / "start" / "affinage-start.json").read_text())
    assert start["from_run"] == str(sft_run) and start["adapter"] == str(sft_run / "final")
    summary = json.loads((dpo_run / "summary.json").read_text())
    assert summary["completed"] and summary["preference"]["start"] == "merged"
    assert summary["preference"]["start_model"] == str(dpo_run / "start")
    assert "Preference pairs (held out)" in (dpo_run / "report.md").read_text()
    rows = {r["stage"]: r for r in run_status(dpo_run)}
    assert list(rows) == ["sft-prepare", "sft", "prepare", "dpo", "eval"]
    assert all(r["state"] == "COMPLETED" for r in rows.values()), rows
    assert rows["sft"]["restarts"] == 1 and rows["sft"]["run_dir"] == str(sft_run)
