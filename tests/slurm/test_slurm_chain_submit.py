"""SFT -> DPO chains and ``--after`` without a cluster: scripts, dependencies, resolved recipes, refusals.

The chain on the real local cluster is in test_slurm_chain.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from slurm_helpers import write_recipe

from affinage.errors import UserError
from affinage.recipe.loader import load_recipe
from affinage.slurm.cli import main as slurm_main
from affinage.slurm.status import read_events, run_status
from affinage.slurm.submit import SubmitError, after_ids, submit


def write_dpo(folder: Path, from_run, task: str = "dpo", name: str = "demo-dpo", extra: str = "") -> Path:
    """A DPO/KTO recipe starting from ``from_run`` (None: no from_run); its paths need not exist to submit."""
    folder.mkdir(parents=True, exist_ok=True)
    start = f", from_run: {from_run}, start: merged" if from_run is not None else ""
    fmt = "preference" if task == "dpo" else "unpaired"
    path = folder / f"{name}.yaml"
    path.write_text(
        f"""name: {name}
task: {task}
model: {{name_or_path: ./tiny-model, init: random}}
method: {{kind: lora, lora: {{r: 4, alpha: 8}}}}
preference: {{beta: 0.1{start}}}
data: {{sources: [{{path: data/prefs.jsonl, format: {fmt}}}], max_length: 64}}
training: {{global_batch_size: 8, micro_batch_size: 1, duration: 10 steps, learning_rate: 2e-4}}
{extra}""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def chain(tmp_path):
    """(SFT recipe, DPO recipe starting from its run dir, SFT run dir, DPO run dir)."""
    sft_run, dpo_run = tmp_path / "runs" / "sft", tmp_path / "runs" / "dpo"
    sft = write_recipe(tmp_path / "chain", extra=f"output: {{dir: {sft_run}}}\n")
    dpo = write_dpo(tmp_path / "chain", sft_run, extra=f"output: {{dir: {dpo_run}}}\n")
    return sft, dpo, sft_run, dpo_run


def test_chain_dry_run_renders_both_runs_and_their_dependencies(chain):
    sft, dpo, sft_run, dpo_run = chain
    result = submit(dpo, "local", pipeline=["prepare", "sft", "dpo", "eval"], from_recipe=sft, dry_run=True, time="00:20:00")
    assert result.run_dir == dpo_run and result.sft_run_dir == sft_run
    assert list(result.scripts) == ["sft-prepare", "sft", "prepare", "dpo", "eval"]
    assert result.scripts["sft-prepare"] == sft_run / "slurm" / "sft-prepare.sbatch"
    assert result.scripts["sft"] == sft_run / "slurm" / "sft.sbatch"
    assert result.scripts["dpo"] == dpo_run / "slurm" / "dpo.sbatch"
    assert result.commands == [
        ["sbatch", "--parsable", "sft-prepare.sbatch"],
        ["sbatch", "--parsable", "--dependency=afterok:<sft-prepare job id>", "sft.sbatch"],
        ["sbatch", "--parsable", "prepare.sbatch"],  # the DPO data is tokenized while the SFT trains
        ["sbatch", "--parsable", "--dependency=afterok:<prepare job id>:<sft job id>", "dpo.sbatch"],
        ["sbatch", "--parsable", "--dependency=afterok:<dpo job id>", "eval.sbatch"],
    ]
    assert result.command_dirs == [sft_run / "slurm"] * 2 + [dpo_run / "slurm"] * 3
    # each run trains from its own resolved copy; the DPO one names the SFT run dir absolutely
    assert load_recipe(sft_run / "recipe.yaml").task == "sft"
    resolved = load_recipe(dpo_run / "recipe.yaml")
    assert resolved.task == "dpo" and resolved.preference.from_run == str(sft_run) and resolved.run_dir() == str(dpo_run)
    # both training jobs have the time-limit signal and the requeue; the SFT job runs in (and records to) its own dir
    for name in ("sft", "dpo"):
        text = result.scripts[name].read_text()
        assert "#SBATCH --signal=B:USR1@30" in text and "#SBATCH --requeue" in text
        assert 'STAGE_ARGS=(-m affinage.cli train "$RUN_DIR"/recipe.yaml --run-dir "$RUN_DIR")' in text
    sft_text = result.scripts["sft"].read_text()
    assert f"RUN_DIRS=(\n  {sft_run}\n)" in sft_text and f"JOBS_FILE={sft_run}/slurm/jobs.jsonl" in sft_text
    assert f"the SFT run that {dpo} starts from" in sft_text
    assert "#SBATCH --job-name=affinage-demo-sft-sft" in sft_text
    assert "#SBATCH --requeue" not in result.scripts["sft-prepare"].read_text()
    for script in result.scripts.values():
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_relative_from_run_is_relative_to_where_submit_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "base").mkdir(parents=True)  # a model folder named relative to here, like runs/demo-cpt/final
    sft = write_recipe(tmp_path / "recipes", extra="output: {dir: runs/sft}\n")
    dpo = write_dpo(tmp_path / "recipes", "runs/sft", extra="output: {dir: runs/dpo}\n")
    dpo.write_text(dpo.read_text().replace("./tiny-model, init: random", "runs/base"))
    result = submit(dpo, "local", pipeline=["sft", "dpo"], from_recipe=sft, dry_run=True)
    assert result.sft_run_dir == tmp_path / "runs" / "sft"
    resolved = load_recipe(tmp_path / "runs" / "dpo" / "recipe.yaml")
    # the job runs in RUN_DIR/slurm: what was relative to the submission folder is written absolute
    assert resolved.preference.from_run == str(tmp_path / "runs" / "sft")
    assert resolved.model.name_or_path == str(tmp_path / "runs" / "base")


def test_from_recipe_must_train_where_the_dpo_recipe_starts(chain, tmp_path):
    sft, dpo, sft_run, dpo_run = chain
    elsewhere = write_recipe(tmp_path / "other", extra=f"output: {{dir: {tmp_path / 'runs' / 'other'}}}\n")
    with pytest.raises(SubmitError) as e:
        submit(dpo, "local", pipeline=["sft", "dpo"], from_recipe=elsewhere, dry_run=True)
    message = str(e.value)
    assert f"--from-recipe {elsewhere} trains in {tmp_path / 'runs' / 'other'}" in message
    assert f"preference.from_run '{sft_run}' = {sft_run}" in message
    assert f"--set preference.from_run={tmp_path / 'runs' / 'other'}" in message
    assert not dpo_run.exists() and not (tmp_path / "runs" / "other").exists()  # refused before anything is written
    # the fix the message gives works
    submit(dpo, "local", pipeline=["sft", "dpo"], from_recipe=elsewhere, dry_run=True,
           overrides=[f"preference.from_run={tmp_path / 'runs' / 'other'}"])


@pytest.mark.parametrize("pipeline, kwargs, message", [
    (["sft", "dpo"], {}, r"pipeline stage sft needs the SFT recipe: give --from-recipe SFT_RECIPE"),
    (["prepare", "dpo"], {"from_recipe": True}, r"--from-recipe names the SFT recipe .* --pipeline has no sft"),
    (["dpo", "sft"], {"from_recipe": True}, r"sft must come before the recipe's training \(dpo\), e.g. --pipeline prepare,sft,dpo,eval"),
    (["sft", "eval"], {"from_recipe": True}, r"sft must come before the recipe's training"),
    (["eval", "sft", "dpo"], {"from_recipe": True}, r"stage 'eval' comes before sft: only stage, check-offline, prepare may"),
    (["sft", "kto"], {"from_recipe": True}, r"pipeline stage 'kto' trains a task: kto recipe, and this recipe has task: dpo: use dpo"),
    (["sft", "train", "dpo"], {"from_recipe": True}, r"trains the recipe twice \(train and dpo\)"),
    (["prepare", "sft", "dpo"], {"after": ["12;rm -rf ~"]}, r"--after '12;rm -rf ~': give the id of a job submitted earlier"),
])
def test_chain_misuse_is_one_clear_error_before_anything_is_written(chain, pipeline, kwargs, message):
    sft, dpo, sft_run, dpo_run = chain
    if kwargs.get("from_recipe"):
        kwargs = {**kwargs, "from_recipe": sft}
    with pytest.raises(SubmitError, match=message) as e:
        submit(dpo, "local", pipeline=pipeline, dry_run=True, **kwargs)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    assert not dpo_run.exists() and not sft_run.exists()


def test_sft_stage_needs_a_preference_recipe_with_from_run(chain, tmp_path):
    sft, dpo, sft_run, dpo_run = chain
    with pytest.raises(SubmitError, match=r"recipe .*recipe.yaml has task: sft: submit the SFT recipe itself with --pipeline prepare,train,eval"):
        submit(sft, "local", pipeline=["sft", "train"], from_recipe=sft, dry_run=True)
    with pytest.raises(SubmitError, match=r"pipeline stage 'dpo' trains a task: dpo recipe, and this recipe has task: sft: use train"):
        submit(sft, "local", pipeline=["prepare", "dpo"], dry_run=True)
    alone = write_dpo(tmp_path / "alone", None)
    with pytest.raises(SubmitError, match=r"has no preference.from_run, so nothing says which SFT run it starts from: set preference.from_run"):
        submit(alone, "local", pipeline=["sft", "dpo"], from_recipe=sft, dry_run=True)
    kto = write_dpo(tmp_path / "kto", sft_run, task="kto", extra=f"output: {{dir: {tmp_path / 'kto-run'}}}\n")
    result = submit(kto, "local", pipeline=["sft", "kto"], from_recipe=sft, dry_run=True)
    assert result.commands[-1] == ["sbatch", "--parsable", "--dependency=afterok:<sft job id>", "kto.sbatch"]


def test_after_waits_for_an_earlier_job_and_is_checked():
    assert after_ids(["123", " 45_6 "]) == ["123", "45_6"]
    for bad in ["", "abc", "12_", "_3", "1:2", "12 13", "$(id)", "afterok:1", "1,2"]:
        with pytest.raises(SubmitError, match="digits \\(123\\) or an array task \\(123_4\\)"):
            after_ids([bad])


def test_after_goes_on_the_first_job_of_each_run(chain, tmp_path, recipe):
    result = submit(recipe, "local", pipeline=["prepare", "train", "eval"], after=["77", "78_1"], run_dir=tmp_path / "r", dry_run=True)
    assert [c[2] for c in result.commands] == ["--dependency=afterok:77:78_1", "--dependency=afterok:<prepare job id>",
                                               "--dependency=afterok:<train job id>"]
    assert "#   --after 78_1" in result.scripts["prepare"].read_text()
    sft, dpo, sft_run, dpo_run = chain  # in a chain both first jobs wait; a sweep's array keeps aftercorr within its run
    result = submit(dpo, "local", pipeline=["prepare", "sft", "dpo"], from_recipe=sft, after=["9"], dry_run=True,
                    sweep=["preference.beta=0.1,0.3"])
    assert result.commands[0] == ["sbatch", "--parsable", "--dependency=afterok:9", "sft-prepare.sbatch"]
    assert result.commands[2] == ["sbatch", "--parsable", "--dependency=afterok:9", "prepare.sbatch"]
    assert result.commands[3] == ["sbatch", "--parsable", "--dependency=aftercorr:<prepare job id>,afterok:<sft job id>", "dpo.sbatch"]
    assert [load_recipe(d / "recipe.yaml").preference.beta for d in result.run_dirs] == [0.1, 0.3]
    assert "#SBATCH --array=0-1" in result.scripts["dpo"].read_text()
    assert "#SBATCH --array" not in result.scripts["sft"].read_text()


def test_cli_dry_run_shows_the_whole_chain_and_errors_are_one_paragraph(chain, capsys):
    sft, dpo, sft_run, dpo_run = chain
    assert slurm_main(["submit", str(dpo), "--cluster", "local", "--pipeline", "prepare,sft,dpo,eval",
                       "--from-recipe", str(sft), "--after", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"sft run   {sft_run}" in out
    assert f"sft-prepare {sft_run}/slurm/sft-prepare.sbatch  job not submitted (--dry-run)" in out
    assert f"dpo         {dpo_run}/slurm/dpo.sbatch  job not submitted (--dry-run)" in out
    assert f"sbatch --parsable --dependency=afterok:<prepare job id>:<sft job id> dpo.sbatch    # in {dpo_run}/slurm" in out
    assert f"sbatch --parsable --dependency=afterok:5 sft-prepare.sbatch    # in {sft_run}/slurm" in out
    assert slurm_main(["submit", str(dpo), "--cluster", "local", "--pipeline", "prepare,sft,dpo", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("affinage: error: pipeline stage sft needs the SFT recipe") and err.count("\n") == 1


FAKE_SBATCH = """#!/bin/bash
# test double: records its arguments and answers the next job id
n=$(( $(cat "$FAKE_SLURM/next" 2>/dev/null || echo 100) + 1 )); echo $n > "$FAKE_SLURM/next"
echo "$PWD $*" >> "$FAKE_SLURM/calls"; echo "$n;local"
"""


def test_submitted_chain_is_recorded_in_both_runs_and_status_shows_it(chain, tmp_path, monkeypatch):
    """sbatch is a test double here (the real cluster run is test_slurm_chain.py): what submit records."""
    sft, dpo, sft_run, dpo_run = chain
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "scontrol").write_text("#!/bin/bash\nexit 1\n")  # SLURM has forgotten every job: status reads jobs.jsonl
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(tmp_path))
    result = submit(dpo, "local", pipeline=["prepare", "sft", "dpo", "eval"], from_recipe=sft)
    assert result.job_ids == {"sft-prepare": "101", "sft": "102", "prepare": "103", "dpo": "104", "eval": "105"}
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[3] == f"{dpo_run / 'slurm'} --parsable --dependency=afterok:103:102 dpo.sbatch"
    assert calls[1] == f"{sft_run / 'slurm'} --parsable --dependency=afterok:101 sft.sbatch"
    own = [e["stage"] for e in read_events(sft_run) if e["event"] == "submitted"]
    assert own == ["sft-prepare", "sft"]
    chain_events = [e for e in read_events(dpo_run) if e["event"] == "submitted"]
    assert [e["stage"] for e in chain_events] == ["sft-prepare", "sft", "prepare", "dpo", "eval"]
    assert chain_events[1]["recorded_in"] == str(sft_run) and chain_events[1]["run_dirs"] == [str(sft_run)]
    # the SFT job's own lines (written by its script) are in the SFT run's file: the DPO status reads them there
    with (sft_run / "slurm" / "jobs.jsonl").open("a") as fh:
        for event, restart, rc in (("started", 0, None), ("requeued", 0, 1), ("started", 1, None), ("ended", 1, 0)):
            row = {"event": event, "stage": "sft", "job_id": "102", "array_job_id": "", "array_task": "", "restart_count": restart}
            fh.write(json.dumps({**row, **({"rc": rc} if rc is not None else {})}) + "\n")
    rows = {r["stage"]: r for r in run_status(dpo_run)}
    assert list(rows) == ["sft-prepare", "sft", "prepare", "dpo", "eval"]
    assert rows["sft"]["state"] == "COMPLETED" and rows["sft"]["restarts"] == 1 and rows["sft"]["run_dir"] == str(sft_run)
    assert rows["dpo"]["run_dir"] == str(dpo_run)
    assert [r["stage"] for r in run_status(sft_run)] == ["sft-prepare", "sft"]
    # a second chain into another DPO run dir is refused while the SFT run has jobs queued
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "JobId=$4 JobState=PENDING Reason=Dependency"\n')
    with pytest.raises(SubmitError, match=f"{sft_run} already has queued or running jobs"):
        submit(dpo, "local", pipeline=["sft", "dpo"], from_recipe=sft, run_dir=tmp_path / "runs" / "dpo2")
