"""Rendered sbatch scripts: golden files for the Jean Zay profiles, quoting that survives a real shell.

Regenerate the golden files after an intended template change with
``AFFINAGE_UPDATE_GOLDEN=1 pytest tests/slurm/test_slurm_render.py`` and read the diff.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from affinage.slurm.profiles import load_profile
from affinage.slurm.render import JobScript, Stage, comment_text, render_job, shell_word
from affinage.slurm.submit import BUILTIN_STAGES

GOLDEN = Path(__file__).parent / "golden"
RUN = Path("/lustre/fswork/projects/rech/abc/uxy12ab/runs/demo-sft")
SWEEP = ("training.learning_rate=1e-4", "training.learning_rate=3e-4")


def job_for(profile_name: str, stage: Stage, nodes: int = 2, sweep: bool = False) -> JobScript:
    profile = load_profile(profile_name)
    allocation = profile.allocate(nodes=nodes, account="abc") if stage.gpu else profile.allocate_cpu("abc")
    return JobScript(
        profile=profile,
        allocation=allocation,
        stage=stage,
        job_name=f"affinage-demo-sft-{stage.name}",
        run_dirs=(RUN / "sweep-0", RUN / "sweep-1") if sweep else (RUN,),
        labels=SWEEP if sweep else ("",),
        jobs_file=RUN / "slurm" / "jobs.jsonl",
        python=profile.python,
        provenance=("recipe recipes/demo-sft.yaml (the job reads its resolved copy RUN_DIR/recipe.yaml)",),
        array=sweep,
    )


CASES = {
    "jean-zay-h100-train.sbatch": ("jean-zay-h100", "train", 2, False),
    "jean-zay-a100-train.sbatch": ("jean-zay-a100", "train", 2, False),
    "jean-zay-v100-train.sbatch": ("jean-zay-v100", "train", 1, False),
    "jean-zay-h100-sweep-train.sbatch": ("jean-zay-h100", "train", 1, True),
    "jean-zay-h100-prepare.sbatch": ("jean-zay-h100", "prepare", 1, False),
    "jean-zay-h100-eval.sbatch": ("jean-zay-h100", "eval", 1, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_scripts_match_golden(name):
    profile, stage, nodes, sweep = CASES[name]
    text = render_job(job_for(profile, BUILTIN_STAGES[stage], nodes, sweep))
    path = GOLDEN / name
    if os.environ.get("AFFINAGE_UPDATE_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"no golden file {path}: run with AFFINAGE_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden file (AFFINAGE_UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_scripts_are_valid_bash_with_literal_sbatch_lines(name):
    profile, stage, nodes, sweep = CASES[name]
    text = render_job(job_for(profile, BUILTIN_STAGES[stage], nodes, sweep))
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch and all(re.fullmatch(r"#SBATCH --[a-z-]+(=[A-Za-z0-9._:@,=+%/-]+)?", line) for line in sbatch), sbatch
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))


def test_train_script_has_the_time_limit_protocol():
    text = render_job(job_for("jean-zay-h100", BUILTIN_STAGES["train"]))
    for needle in ("#SBATCH --signal=B:USR1@600", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                   "trap request_stop USR1", 'scontrol requeue "$SLURM_JOB_ID"', "export HF_HUB_OFFLINE=1",
                   "export HF_DATASETS_OFFLINE=1", "export WANDB_MODE=offline", "--rdzv_backend=c10d",
                   'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1', "RDZV_PORT=$((10000 + SLURM_JOB_ID % 20000))"):
        assert needle in text, needle
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert not re.search(r"\$\{?HOME\b|~/", code)  # caches and everything else off $HOME
    other = render_job(job_for("jean-zay-h100", BUILTIN_STAGES["eval"]))
    assert "--requeue" not in other and "USR1" not in other


NASTY = [
    "plain",
    "with space",
    "$(touch /tmp/affinage-pwned)",
    "`touch /tmp/affinage-pwned`",
    "it's",
    'say "hi"',
    "line\nbreak; touch /tmp/affinage-pwned",
    "*",
    "a\\b",
    "-n",
    "",
    "{run_dir}/recipe.yaml",
    "x{run_dir}y",
]


def test_shell_word_survives_bash(tmp_path):
    """Each value, rendered as a word, reaches the program unchanged ({run_dir} becomes the run dir)."""
    run_dir = "/runs/$(x) 'q'"
    words = " ".join(shell_word(v) for v in NASTY)
    script = f"RUN_DIR={shell_word(run_dir)}\nARGS=({words})\nprintf '%s\\0' \"${{ARGS[@]}}\"\n"
    out = subprocess.run(["bash", "-c", script], capture_output=True, cwd=tmp_path, check=True).stdout
    expected = [v.replace("{run_dir}", run_dir) for v in NASTY]
    assert out.decode().split("\0")[:-1] == expected
    assert list(tmp_path.iterdir()) == [] and not Path("/tmp/affinage-pwned").exists()


def test_comment_text_keeps_a_comment_on_one_line():
    assert comment_text("a\nb\r\tc é") == "a\\nb\\r\\tc é"


def test_group_sharing_profile_sets_a_group_writable_umask_and_sigterm_is_recorded():
    import dataclasses

    job = job_for("jean-zay-h100", BUILTIN_STAGES["train"], 1)
    plain = render_job(job)
    assert "umask" not in plain
    assert "trap 'TERM_RECEIVED=1" in plain and "record terminated" in plain and '"$RC" -eq 4' in plain
    shared = render_job(dataclasses.replace(job, profile=job.profile.model_copy(update={"sharing": "group"})))
    assert "umask 0002" in shared
    assert subprocess.run(["bash", "-n"], input=shared, text=True).returncode == 0
