"""CI smoke check of the eval throughput benchmark (bench/bench_eval.py --quick): it must run, not be fast.

Tiny sizes (4 novel passages, a 1-layer 64-wide Llama with Lucie's 65k vocabulary, one repeat). Checks
that every set-up produces its numbers and that packed eval, padded eval and lm-eval (when importable)
agree on the summed NLL of the same texts — the benchmark compares speeds of the same computation.
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
    not (SHARED / "tokenizers" / "lucie-7b-instruct").is_dir() or not (SHARED / "data" / "fr_literature_roman19.jsonl").is_file(),
    reason="needs ../shared (Lucie tokenizer and the 19th-century novels)",
)


def test_bench_eval_quick_measures_every_setup(tmp_path):
    bench = load_script("bench/bench_eval.py")
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for name in ("eval", "eval-disjoint", "eval-padded", "train-fwd"):
        s = res["setups"][name]
        assert s["repeats"] == 1 and s["read_tokens_per_s"]["median"] > 0 and s["scored_tokens_per_s"]["median"] > 0
    assert res["setups"]["eval"]["read_tokens_per_s"]["median"] >= res["setups"]["eval"]["scored_tokens_per_s"]["median"]
    assert res["set"]["documents"] == 4 and res["set"]["books"] == 4
    assert res["nll"]["eval"] == pytest.approx(res["nll"]["eval-padded"], rel=1e-4)
    assert {"eval_over_train_forward", "eval_disjoint_over_train_forward"} <= set(res["ratios"])
    if "lm-eval" in res["setups"]:  # lm-eval's rolling windows are disjoint: a different but close NLL
        assert res["nll"]["lm-eval"] > 0
    else:
        assert "lm_eval" in res["lm_eval"]["skipped"]
