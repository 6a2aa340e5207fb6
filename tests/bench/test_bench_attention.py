"""CI check of bench/bench_attention.py: every row runs and computes the same attention (speed not judged)."""

from __future__ import annotations

import json
from pathlib import Path

from testlib import load_script

REPO = Path(__file__).resolve().parents[2]


def test_bench_attention_rows_agree_and_report_every_mix(tmp_path):
    bench = load_script("bench/bench_attention.py")
    out = tmp_path / "attn.json"
    assert bench.main(["--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["mixes"]) == set(bench.mixes())
    for m in res["mixes"].values():
        assert max(m["max_abs_diff"].values()) < 1e-5  # float32; measured ≤ 1e-6
        assert all(lo <= med <= hi for lo, med, hi in m["ms"].values())
    assert res["mixes"]["32 × 64 tokens"]["grouped_calls"] == 1
    assert res["mixes"]["CPT, 1024 + 512 + 512"]["grouped_calls"] == 3
