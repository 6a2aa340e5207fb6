"""Command-line arguments no run can use are refused with one clear line (exit 2), never a traceback."""

from __future__ import annotations

import pytest

from affinage.cli import main
from testlib import REPO

DEMO = str(REPO / "recipes" / "demo" / "full" / "cpt.yaml")


def _run(capsys, *argv) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("argv,says", [
    (["plan", DEMO, "--world-size", "0"], "--world-size: must be at least 1 (got 0)"),
    (["plan", DEMO, "--world-size", "-1"], "--world-size: must be at least 1 (got -1)"),
    (["smoke", DEMO, "--steps", "0"], "--steps: must be at least 1 (got 0)"),
    (["train", DEMO, "--nproc", "0"], "--nproc: must be at least 1"),
    (["eval", "runs/x", "--limit", "-5"], "--limit: must be at least 1 (got -5)"),
    (["prepare", DEMO, "--num-proc", "zero"], "expected a whole number"),
])
def test_bad_numbers(capsys, argv, says):
    code, err = _run(capsys, *argv)
    assert code == 2 and says in err


def test_run_dir_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    for cmd in ("train", "prepare", "smoke"):
        code, err = _run(capsys, cmd, DEMO, "--run-dir", str(f))
        assert code == 2 and "is an existing file, not a folder" in err, cmd
    assert f.read_text() == "mine"


def test_status_and_eval_on_what_is_not_a_run(capsys, tmp_path):
    code, err = _run(capsys, "status", str(tmp_path / "absent"))
    assert code == 2 and "does not exist" in err
    code, err = _run(capsys, "status", str(tmp_path))
    assert code == 2 and "not an affinage run directory" in err
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    code, err = _run(capsys, "status", str(tmp_path))
    assert code == 2 and "was not submitted" in err
    code, err = _run(capsys, "eval", str(tmp_path / "absent-run"))
    assert code == 2 and "absent-run: no such run directory" in err and "eval:" not in err


def test_plan_refuses_what_cannot_fit(capsys):
    code, err = _run(capsys, "plan", DEMO, "--set", "data.max_length=1000000", "--set", "training.global_batch_size=1024",
                     "--set", "training.micro_batch_size=1")
    assert code == 2 and "tokens per optimizer step" in err
    code, err = _run(capsys, "plan", DEMO, "--set", "data.max_length=100000", "--gpu", "v100-16")
    assert code == 2 and "will not fit" in err and "v100-16" in err
    code, _ = _run(capsys, "plan", DEMO, "--gpu", "v100-16")
    assert code == 0
