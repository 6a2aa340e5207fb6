"""Rendered scripts really running on the local two-node SLURM cluster (slurm/local-cluster.sh).

Training itself is replaced by small scripts (tests/slurm/jobs/) so that each test takes seconds;
the launch template, quoting, dependencies, arrays and the stop/requeue protocol are the real ones.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from slurm_helpers import HARNESS, JOBS

from affinage.slurm.profiles import ProfileError
from affinage.slurm.render import Stage
from affinage.slurm.status import JobFailed, format_status, read_events, run_status, wait_for_job
from affinage.slurm.submit import SubmitError, submit

pytestmark = pytest.mark.usefixtures("local_cluster")


def write_file_stage(name: str, text: str = "done", distributed: bool = False) -> Stage:
    """A stage that appends ``text`` and the time to RUN_DIR/<name>.txt."""
    code = "import sys, time, pathlib; p = pathlib.Path(sys.argv[1], sys.argv[2] + '.txt'); p.open('a').write(sys.argv[3] + ' ' + repr(time.time()) + chr(10))"
    return Stage(name, ("-c", code, "{run_dir}", name, text), distributed=distributed)


def wait_for_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def events(run: Path, kind: str, stage: str | None = None) -> list[dict]:
    return [e for e in read_events(run) if e["event"] == kind and (stage is None or e["stage"] == stage)]


def test_a_tiny_command_runs_through_sbatch(tmp_path, recipe):
    run = tmp_path / "run"
    t0 = time.monotonic()
    result = submit(recipe, "local", run_dir=run, pipeline=[write_file_stage("hello")])
    wait_for_job(result.job_ids["hello"], timeout=60)
    latency = time.monotonic() - t0
    assert (run / "hello.txt").read_text().startswith("done ")
    assert [e["event"] for e in read_events(run)] == ["submitted", "started", "ended"]
    assert events(run, "ended")[0]["rc"] == 0 and events(run, "started")[0]["restart_count"] == 0
    assert (run / "slurm" / f"hello-{result.job_ids['hello']}.out").exists()
    print(f"submit -> COMPLETED: {latency:.2f} s")


def test_a_pipeline_runs_in_order(tmp_path, recipe):
    run = tmp_path / "run"
    slow = Stage("first", ("-c", "import sys, time, pathlib; time.sleep(2); pathlib.Path(sys.argv[1], 'order.txt').open('a').write('first\\n')", "{run_dir}"),
                 gpu=False)  # a CPU stage, like prepare
    then = [Stage(n, ("-c", f"import sys, pathlib; pathlib.Path(sys.argv[1], 'order.txt').open('a').write('{n}\\n')", "{run_dir}")) for n in ("second", "third")]
    result = submit(recipe, "local", run_dir=run, pipeline=[slow, *then])
    assert [e["dependency"] for e in events(run, "submitted")] == [
        None, f"afterok:{result.job_ids['first']}", f"afterok:{result.job_ids['second']}"]
    wait_for_job(result.job_ids["third"], timeout=90)
    assert (run / "order.txt").read_text().split() == ["first", "second", "third"]
    assert "#SBATCH --time=00:30:00" in result.scripts["first"].read_text()  # the profile's cpu_jobs time


def test_a_failed_stage_cancels_the_stages_after_it(tmp_path, recipe):
    run = tmp_path / "run"
    fail = Stage("fail", ("-c", "raise SystemExit(5)"))
    result = submit(recipe, "local", run_dir=run, pipeline=[fail, write_file_stage("never")])
    with pytest.raises(JobFailed, match="FAILED"):
        wait_for_job(result.job_ids["fail"], timeout=60)
    wait_for_job(result.job_ids["never"], states=("CANCELLED",), timeout=60)
    assert not (run / "never.txt").exists()
    assert events(run, "ended", "fail")[0]["rc"] == 5


def test_a_sweep_runs_every_member_in_its_own_dir(tmp_path, recipe):
    run = tmp_path / "run"
    read_lr = Stage("lr", ("-c", "import sys, yaml, pathlib; d = pathlib.Path(sys.argv[1]); "
                             "d.joinpath('lr.txt').write_text(str(yaml.safe_load(d.joinpath('recipe.yaml').read_text())['training']['learning_rate']))",
                             "{run_dir}"))
    result = submit(recipe, "local", run_dir=run, sweep=["training.learning_rate=1e-4,3e-4,5e-4"],
                    pipeline=[read_lr, write_file_stage("after")])
    wait_for_job(result.job_ids["after"], timeout=120)
    records = wait_for_job(result.job_ids["lr"], timeout=10)
    assert sorted(r.array_task for r in records) == ["0", "1", "2"]
    assert [float((d / "lr.txt").read_text()) for d in result.run_dirs] == [1e-4, 3e-4, 5e-4]
    assert all((d / "after.txt").exists() for d in result.run_dirs)
    assert events(run, "submitted")[1]["dependency"] == f"aftercorr:{result.job_ids['lr']}"
    rows = run_status(run)
    assert [(r["job"], r["state"]) for r in rows if r["stage"] == "lr"] == [
        (f"{result.job_ids['lr']}_{i}", "COMPLETED") for i in range(3)]


def test_two_nodes_all_reduce_with_the_train_launcher(tmp_path, recipe):
    run = tmp_path / "run"
    stage = Stage("ranks", (str(JOBS / "ranks.py"), "{run_dir}"), distributed=True)
    result = submit(recipe, "local", nodes=2, run_dir=run, pipeline=[stage])
    assert "--nproc_per_node=1" in result.scripts["ranks"].read_text()
    wait_for_job(result.job_ids["ranks"], timeout=120)
    reports = [json.loads((run / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["rank"] for r in reports] == [0, 1]
    assert [r["sum"] for r in reports] == [3.0, 3.0]  # (0 + 1) + (1 + 1): both ranks took part
    assert sorted(r["node_id"] for r in reports) == ["0", "1"]  # one process on each node
    assert events(run, "started")[0]["nodes"] == "node[1-2]"


def test_injection_through_paths_and_values_executes_nothing(tmp_path, recipe):
    canaries = [Path(f"/tmp/affinage-pwned-{uuid.uuid4().hex}") for _ in range(4)]
    run = tmp_path / f"run $(touch {canaries[0]}) `touch {canaries[1]}` it's \"q\"\n; touch {canaries[2]}"
    description = f"$(touch {canaries[3]}) `touch {canaries[3]}` '\"\nrm -rf /nonexistent"
    trainer = Stage("train", (str(JOBS / "fake_trainer.py"), "{run_dir}"), distributed=True, requeue=True)
    check = Stage("check", ("-c", "import sys, yaml; r = yaml.safe_load(open(sys.argv[1])); open(sys.argv[2], 'w').write(r['description'])",
                            "{run_dir}/recipe.yaml", "{run_dir}/description.txt"))
    result = submit(recipe, "local", run_dir=run, pipeline=[trainer, check],
                    overrides=[f"description={json.dumps(description)}"])
    wait_for_file(run / "trainer-started-0")
    subprocess.run(["scancel", "--batch", "--signal=USR1", result.job_ids["train"]], check=True)
    wait_for_job(result.job_ids["check"], timeout=120)
    assert (run / "description.txt").read_text() == description  # the value arrived intact, as data
    assert [e["restart_count"] for e in events(run, "started", "train")] == [0, 1]
    assert not [c for c in canaries if c.exists()]
    with pytest.raises(ProfileError, match="cannot go into an #SBATCH line"):
        submit(recipe, "local", run_dir=tmp_path / "other", account=f"x$(touch {canaries[0]})")
    assert not canaries[0].exists()


def test_time_limit_stop_requeues_and_dependents_wait(tmp_path, recipe):
    run = tmp_path / "run"
    trainer = Stage("train", (str(JOBS / "fake_trainer.py"), "{run_dir}"), distributed=True, requeue=True)
    result = submit(recipe, "local", run_dir=run, pipeline=[trainer, write_file_stage("after")])
    train_id = result.job_ids["train"]
    assert "#SBATCH --signal=B:USR1@30" in result.scripts["train"].read_text()
    wait_for_file(run / "trainer-started-0")
    wait_for_job(result.job_ids["after"], states=("PENDING",), timeout=5)
    signalled = time.monotonic()
    subprocess.run(["scancel", "--batch", "--signal=USR1", train_id], check=True)
    wait_for_file(run / "trainer-started-1")
    cycle = time.monotonic() - signalled
    wait_for_job(train_id, timeout=60)
    wait_for_job(result.job_ids["after"], timeout=60)

    train_events = [(e["event"], e["job_id"], e["restart_count"]) for e in read_events(run) if e["stage"] == "train" and e["event"] != "submitted"]
    assert train_events == [("started", train_id, 0), ("requeued", train_id, 0), ("started", train_id, 1), ("ended", train_id, 1)]
    final = events(run, "ended", "train")[0]
    after_time = float((run / "after.txt").read_text().split()[1])
    assert final["rc"] == 0 and after_time > (run / "trainer-started-1").stat().st_mtime  # waited for the rerun
    rows = {r["stage"]: r for r in run_status(run)}
    assert rows["train"]["restarts"] == 1 and rows["train"]["state"] == "COMPLETED" and rows["train"]["step"] == 2
    assert "train  " in format_status(run, list(rows.values()))
    print(f"requeue cycle (USR1 -> trainer running again): {cycle:.1f} s")


def test_a_stop_without_the_time_limit_signal_is_a_failure(tmp_path, recipe):
    """Exit 3 without USR1 (someone created STOP by hand) must not requeue nor release afterok."""
    run = tmp_path / "run"
    trainer = Stage("train", (str(JOBS / "fake_trainer.py"), "{run_dir}"), distributed=True, requeue=True)
    result = submit(recipe, "local", run_dir=run, pipeline=[trainer, write_file_stage("after")])
    wait_for_file(run / "trainer-started-0")
    (run / "STOP").touch()
    with pytest.raises(JobFailed):
        wait_for_job(result.job_ids["train"], timeout=60)
    wait_for_job(result.job_ids["after"], states=("CANCELLED",), timeout=60)
    assert not events(run, "requeued") and events(run, "ended", "train")[0]["rc"] != 0


def test_a_busy_run_dir_is_refused(tmp_path, recipe):
    run = tmp_path / "run"
    sleeper = Stage("sleep", ("-c", "import time; time.sleep(30)"))
    result = submit(recipe, "local", run_dir=run, pipeline=[sleeper])
    try:
        with pytest.raises(SubmitError, match="already has queued or running jobs"):
            submit(recipe, "local", run_dir=run, pipeline=[sleeper])
    finally:
        subprocess.run(["scancel", result.job_ids["sleep"]], check=True)


def test_the_real_train_stage_trains_a_tiny_model(tmp_path, tiny_llama_dir, demo_data):
    """`affinage train` from the resolved recipe, under torchrun on gloo, through the train template."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"""name: tiny-sft
task: sft
seed: 7
model: {{name_or_path: {tiny_llama_dir}, dtype: float32}}
method: {{kind: lora, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
data: {{sources: [{{path: {demo_data / 'qa_culture.jsonl'}, format: chat, max_records: 16}}], max_length: 96}}
training: {{global_batch_size: 4, micro_batch_size: 2, duration: 4 steps, report_to: [none]}}
""",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    result = submit(recipe, "local", run_dir=run)
    wait_for_job(result.job_ids["train"], timeout=600)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 4 and summary["world_size"] == 1
    assert (run / "final" / "adapter_config.json").exists()
    assert run_status(run)[0]["step"] == 4


def test_harness_start_is_idempotent(local_cluster):
    proc = subprocess.run([str(HARNESS), "start"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "already running" in proc.stdout
    assert "node1 node2 # affinage-local-slurm" in Path("/etc/hosts").read_text()
    assert local_cluster.slurm_conf.endswith("/etc/slurm.conf")
