"""Run directories: never cleaned when they hold foreign files or another recipe's run; one train at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from affinage.runlock import LOCK_NAME, RunDirError, RunLock, check_run_dir


def test_foreign_files_refused_whatever_fresh(tmp_path):
    (tmp_path / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(RunDirError, match=r"holds files affinage did not write \(thesis.tex\)"):
        check_run_dir(tmp_path, "demo")


def test_checkpoints_without_recipe_refused(tmp_path):
    (tmp_path / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "final").mkdir()
    with pytest.raises(RunDirError, match="no recipe.yaml"):
        check_run_dir(tmp_path, "demo")


def test_foreign_entry_inside_checkpoints_refused(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: demo\n")
    (tmp_path / "checkpoints" / "best-model").mkdir(parents=True)
    with pytest.raises(RunDirError, match="checkpoints/best-model"):
        check_run_dir(tmp_path, "demo")


def test_other_recipe_refused_same_recipe_accepted(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: other-run\n")
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(RunDirError, match="a run of recipe 'other-run', not of 'demo'"):
        check_run_dir(tmp_path, "demo")
    check_run_dir(tmp_path, "other-run")  # its own run: resumable
    check_run_dir(tmp_path / "absent", "demo")  # a new folder
    empty = tmp_path / "empty"
    empty.mkdir()
    check_run_dir(empty, "demo")
    (empty / "data_stats.json").write_text("{}")  # `affinage prepare` wrote only this
    check_run_dir(empty, "demo")


def test_second_lock_refused_with_host_and_pid(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(RunDirError) as e:
            RunLock(tmp_path).acquire()
        assert f"pid {os.getpid()}" in str(e.value) and "host " in str(e.value)
        with pytest.raises(RunDirError):
            RunLock(tmp_path).check_free()
    finally:
        first.release()
    RunLock(tmp_path).acquire().release()  # free again


def test_killed_holder_leaves_no_stuck_lock(tmp_path):
    code = textwrap.dedent(f"""
        import os, sys, time
        from affinage.runlock import RunLock
        lock = RunLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"pid {p.pid}"):
            RunLock(tmp_path).acquire()
        p.kill()
        p.wait(timeout=10)
        RunLock(tmp_path).acquire().release()  # the kernel dropped the dead process's lock
        assert (tmp_path / LOCK_NAME).is_file()
    finally:
        p.kill()
