"""`affinage check-offline`: plan and smoke with no network at all; anything that tries is named."""

from __future__ import annotations

import sys

import pytest
from testlib import REPO

from affinage.offline import OfflineError, check_offline, namespace_prefix, run_offline
from affinage.stage import stage

DEMO = REPO / "recipes" / "demo"


def test_guard_refuses_a_connection_and_names_host_and_caller(tmp_path):
    script = tmp_path / "fetch.py"
    script.write_text("import urllib.request\nurllib.request.urlopen('https://example.org/data.jsonl', timeout=5)\n")
    report = run_offline([[sys.executable, str(script)]])
    assert report.runs[0].returncode != 0 and "network access to example.org:443 refused" in report.runs[0].output
    attempt = report.attempts[0]
    assert attempt["host"] == "example.org" and attempt["port"] == 443 and attempt["what"] == "name lookup"
    assert attempt["where"] == f"{script}:2"  # the line that asked, not the socket library


def test_loopback_stays_open_and_the_namespace_cuts_the_rest(tmp_path):
    code = (
        "import socket\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)\n"
        "c = socket.create_connection(srv.getsockname(), timeout=5); print('loopback ok')\n"
        "import _socket\n"  # below the Python guard: only the namespace can stop this one
        "s = _socket.socket(); s.settimeout(3)\n"
        "try:\n    s.connect(('1.1.1.1', 443)); print('reached the internet')\n"
        "except OSError as e:\n    print('raw connect failed', e.errno)\n"
    )
    prefix, how = namespace_prefix()
    if not prefix:
        pytest.skip(how)
    report = run_offline([[sys.executable, "-c", code]])
    out = report.runs[0].output
    assert "loopback ok" in out and "raw connect failed" in out and "reached the internet" not in out
    assert report.isolation.startswith("network namespace")


def test_demo_recipe_staged_passes_check_offline(tmp_path):
    result = stage(DEMO / "full" / "cpt.yaml", tmp_path / "staged")
    report = check_offline(result.recipe, steps=2)
    assert report.ok and [r.command[3] for r in report.runs] == ["plan", "smoke"]
    assert all(r.returncode == 0 for r in report.runs)


def test_check_offline_fails_naming_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: t
task: cpt
model: {{name_or_path: OpenLLM-France/Lucie-7B-Instruct, mirrors: []}}
data: {{sources: [{{path: {DEMO / 'data' / 'histoire.jsonl'}, format: text}}]}}
training: {{global_batch_size: 2, duration: 2 steps}}
""")
    with pytest.raises(OfflineError) as info:
        check_offline(recipe)
    text = str(info.value)
    assert "`affinage plan` exited 2" in text and "OpenLLM-France/Lucie-7B-Instruct" in text
