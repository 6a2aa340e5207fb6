"""The side-by-side bench (bench/bench_sft.py --quick): every in-process row trains and reports its numbers.

Slow (one fresh process per row, ~9 s of imports each), so marked ``slow``; the peers are left out
(they need bench/peers/install.sh). Numbers mean nothing at this size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from testlib import load_script

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("AFFINAGE_SHARED") or REPO.parent / "shared")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "tokenizers" / "lucie-7b-instruct").is_dir() or not (SHARED / "data").is_dir(),
                       reason="needs ../shared (Lucie tokenizer and the French corpora)"),
]


def test_bench_sft_quick_rows(tmp_path):
    bench = load_script("bench/bench_sft.py")
    out = tmp_path / "sft.json"
    assert bench.main(["--quick", "--tasks", "lora-sft,cpt", "--peers", "", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["tasks"]
    for task, rows in (("lora-sft", ("trl", "affinage", "affinage-no-selective", "affinage-no-packing")),
                       ("cpt", ("trl", "affinage", "affinage-chunked", "affinage-no-packing"))):
        for row in rows:
            st = res[task][row]["stats"]
            assert st["whole_samples_per_s"]["median"] > 0 and st["peak_rss_gb"]["median"] > 0, (task, row)
            assert st["final_loss"]["median"] > 0 and st["load"]["n"] >= 1
        assert res[task]["trl"]["runs"][0]["compact_head"] is True  # TRL's compact head really forced on CPU
        assert res[task]["affinage"]["stats"]["padding_fraction"]["max"] == 0
