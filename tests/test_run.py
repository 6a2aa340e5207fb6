"""RunDir and its writers: scrubbed, atomic, modes from the umask, torn lines, folders not ours."""

from __future__ import annotations

import json
import os
import stat

import pytest

import affinage.run as run_module
from affinage.run import (
    FolderNotOursError,
    RunDir,
    append_line,
    apply_sharing,
    claim_folder,
    make_dir,
    read_jsonl,
    write_json,
    write_text,
)

TOKEN = "hf_" + "abcdefghijklmnopqrstuvwx"


@pytest.fixture
def umask():
    """Set a umask for one test, restore it after."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(saved)
    run_module._GROUP_SHARED = False


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writers_scrub_tokens_and_credential_values(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "value-of-the-key")
    write_text(tmp_path / "a.txt", f"token {TOKEN} and value-of-the-key")
    write_json(tmp_path / "b.json", {"description": f"token {TOKEN}", TOKEN: 1})
    append_line(tmp_path / "c.jsonl", json.dumps({"note": f"value-of-the-key {TOKEN}"}))
    for name in ("a.txt", "b.json", "c.jsonl"):
        text = (tmp_path / name).read_text()
        assert TOKEN not in text and "value-of-the-key" not in text and "[redacted]" in text


def test_modes_follow_a_002_umask(tmp_path, umask):
    umask(0o002)
    d = make_dir(tmp_path / "x" / "y")
    write_text(d / "f.txt", "hello")
    write_text(d / "job.sbatch", "#!/bin/bash\n", executable=True)
    append_line(d / "m.jsonl", "{}")
    assert mode(tmp_path / "x") == mode(d) == 0o775
    assert mode(d / "f.txt") == mode(d / "m.jsonl") == 0o664
    assert mode(d / "job.sbatch") == 0o775
    umask(0o077)
    write_text(d / "private.txt", "x")
    assert mode(d / "private.txt") == 0o600  # a stricter umask is honoured too


def test_sharing_group_gives_group_read_write_and_setgid_folders(tmp_path, umask):
    umask(0o022)
    apply_sharing("user")
    assert os.umask(0o022) == 0o022
    apply_sharing("group")
    d = make_dir(tmp_path / "shared" / "run")
    write_text(d / "f.txt", "x")
    assert mode(d / "f.txt") == 0o664
    assert mode(d) & 0o2070 == 0o2070 and mode(tmp_path / "shared") & 0o2070 == 0o2070


def test_torn_lines_are_skipped_and_counted_and_the_next_append_stays_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    rows, bad = read_jsonl(path)
    assert rows == [{"step": 1, "loss": 2.0}] and bad == 1
    append_line(path, json.dumps({"step": 2, "loss": 1.5}))
    rows, bad = read_jsonl(path)
    assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}] and bad == 1
    run = RunDir(tmp_path)
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    assert run.repair_metrics() == 1 and path.read_text() == '{"step": 1}\n' and run.repair_metrics() == 0


def test_a_folder_affinage_did_not_create_is_never_claimed(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(FolderNotOursError, match="never replaces a folder it did not create"):
        claim_folder(mine, ("merge_report.json",), "merge output")
    with pytest.raises(FolderNotOursError):
        RunDir.create(mine)
    assert claim_folder(tmp_path / "new", ("x",), "out") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    claim_folder(tmp_path / "empty", ("x",), "out")
    run = RunDir.create(tmp_path / "run")
    write_text(run.recipe, "name: x\n")
    assert RunDir.create(run.root) == run  # a run directory is reopened


def test_every_run_path_lives_in_the_run_directory(tmp_path):
    run = RunDir(tmp_path)
    paths = {name: getattr(run, name) for name in ("recipe", "identity", "data_stats", "metrics", "tensorboard", "checkpoints",
                                                   "final", "merged", "summary", "stop_file", "runtime", "eval_results",
                                                   "provenance", "report", "jobs")}
    assert all(p.is_relative_to(tmp_path) for p in paths.values())
    assert len(set(paths.values())) == len(paths)
    assert paths["jobs"].parent == run.slurm and paths["runtime"].parent == run.distributed
