"""CI smoke check of bench/bench_dpo.py --quick: both set-ups train on the same pairs; the numbers mean nothing at this size."""

from __future__ import annotations

import json
from pathlib import Path

from testlib import load_script

REPO = Path(__file__).resolve().parents[2]


def test_bench_dpo_quick_runs_both_setups(tmp_path):
    bench = load_script("bench/bench_dpo.py")
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    (a,), (c,) = res["runs"]["a"], res["runs"]["c"]
    for r in (a, c):
        assert r["pairs_per_s"] > 0 and r["peak_rss_gb"] > 0 and r["final_loss"] is not None
    assert a["gradient_checkpointing"] is True  # TRL's default, measured as such
    # same model, pairs, order, batch and learning rate: both runs end on the same DPO loss
    assert abs(a["final_loss"] - c["final_loss"]) < 1e-3, (a["final_loss"], c["final_loss"])
    assert res["c_over_a"]["mean"] > 0
