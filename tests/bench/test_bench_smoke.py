"""CI smoke check of the throughput benchmark (bench/bench_packing.py --quick): it must run, not be fast.

Tiny sizes (8 SFT and 6 CPT samples, a 1-layer 64-wide Llama with Lucie's 65k vocabulary, one
repeat): checks that the three set-ups train on the real tokenizer and data and that every number
the full benchmark prints is produced. The numbers themselves mean nothing at this size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from testlib import load_script

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("AFFINAGE_SHARED") or REPO.parent / "shared")

pytestmark = pytest.mark.skipif(
    not (SHARED / "tokenizers" / "lucie-7b-instruct").is_dir() or not (SHARED / "data").is_dir(),
    reason="needs ../shared (Lucie tokenizer and the French corpora)",
)


def test_bench_quick_runs_all_three_setups(tmp_path):
    bench = load_script("bench/bench_packing.py")
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for task in ("sft", "cpt"):
        for kind in ("a", "b", "c"):
            (run,) = res["runs"][task][kind]
            assert run["samples_per_s"] > 0 and run["tokens_per_s"] > 0
            assert run["final_loss"] is not None and run["peak_rss_gb"] > 0
            assert 0 <= run["padding_fraction"] < 1
        assert res["runs"][task]["c"][0]["padding_fraction"] == 0  # padding-free batches
        assert res["runs"][task]["c"][0]["attn"] == "affinage_varlen"
        assert len(res["ratios"][f"{task} c/a"]) == 1 and len(res["ratios"][f"{task} c/b"]) == 1
    for t in res["tokenization"]:
        assert t["hit"] and t["tokens_per_s_per_process"] > 0 and t["padding_fraction"] == 0
