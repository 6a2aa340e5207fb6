"""CI smoke check of bench/bench_prepare.py: it runs on a few records and reports every figure (not fast)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from testlib import load_script

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("AFFINAGE_SHARED") or REPO.parent / "shared")

pytestmark = pytest.mark.skipif(
    not (SHARED / "tokenizers" / "qwen2.5-instruct").is_dir() or not (SHARED / "data").is_dir(),
    reason="needs ../shared (Qwen and Lucie tokenizers and the French corpora)",
)


def test_bench_prepare_reports_ratios_against_raw_encode_batch(tmp_path):
    bench = load_script("bench/bench_prepare.py")
    out = tmp_path / "b.json"
    assert bench.main(["--repeats", "1", "--sft-records", "30", "--cpt-records", "30", "--cache", str(tmp_path / "c"),
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["task"] for r in res["results"]] == ["cpt", "sft"]
    for r in res["results"]:
        assert r["records"] == 30 and r["tokens"] > 1000
        for k in ("raw_tokens_per_cpu_s", "affinage_tokens_per_cpu_s", "affinage_over_raw", "prepare_over_raw"):
            assert 0 < r[k]["min"] <= r[k]["median"] <= r[k]["max"], k
