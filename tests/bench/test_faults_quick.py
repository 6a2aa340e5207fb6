"""The fault campaign's fast subset (bench/faults.py --quick): the whole bad-input table and two SIGKILLs.

Every bad input (recipes, data files, chat records, command-line arguments, model folders, run
directories) must get a clear one-paragraph error: no traceback, no hang, no silent acceptance; a run
killed twice (once while a checkpoint is written) must resume to weights bitwise equal to an
uninterrupted run, with one metrics line per step. The full campaign (24 kills, corruption, full disk,
concurrency) is ``python bench/faults.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from testlib import load_script

REPO = Path(__file__).resolve().parents[2]


def test_fault_campaign_quick(tmp_path):
    # The campaign forks its training runs from its own process (bench/faults.py: Forked). It runs as a
    # fresh `python bench/faults.py`, never inside pytest: a fork of a process that has already run
    # torch's OpenMP pool or other tests' threads can deadlock in the child (CI saw a 600 s hang).
    out = tmp_path / "faults.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "faults.py"), "--quick", "--work", str(tmp_path / "work"),
                        "--json", str(out)], capture_output=True, text=True, timeout=1500)
    assert out.exists(), f"the campaign ended with {r.returncode} and no result:\n{r.stderr[-3000:]}"
    result = json.loads(out.read_text())
    faults = load_script("bench/faults.py")
    t = result["totals"]
    bad = [c for c in result["cases"] if c["result"] != "clear"]
    assert not bad, "\n".join(f"{c['result']}: {c['group']}: {c['name']}: {c['message']}" for c in bad)
    assert t["bad_inputs"] >= 80
    assert {c["group"] for c in result["cases"]} >= {"recipe file", "recipe value", "cli", "data file", "chat record", "model folder"}
    assert t["kills"] == 2 and t["kills_during_checkpoint_write"] >= 1
    assert t["lost_runs"] == t["weight_mismatches"] == t["metrics_duplicates"] == 0, result["kills"]
    assert faults.failures(t) == 0
