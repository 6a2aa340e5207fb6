"""CI check of the GPU run (bench/gpu.py --dry): every case runs on CPU with tiny shapes and reports its numbers.

The figures mean nothing at this size; the test keeps the script from rotting until a GPU runs it:
every case (LoRA/full with kernels off and on, QLoRA when bitsandbytes is installed, packed vs
unpacked, TRL at its best) must produce a positive throughput, and packed rows must give the
per-token losses of their segments run alone (float32, within 1e-4).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_script_dry_runs_every_case(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    out = tmp_path / "dry.json"
    rc = gpu.main(["--dry", "--out", str(out), "--workdir", str(tmp_path / "work")])
    res = json.loads(out.read_text())
    errors = {k: v["error"] for k, v in res["cases"].items() if "error" in v}
    assert rc == 0 and not errors, errors
    cases = res["cases"]
    for name in ("lora", "lora-kernels", "full", "full-kernels", "trl"):
        assert cases[name]["tokens_per_s"] > 0 and cases[name]["final_loss"] is not None, name
    assert cases["lora-kernels"]["loss_backend"] == "torch" and cases["lora"]["loss_backend"] == "plain"  # CPU: chunked torch path
    assert cases["full"]["flops_per_token"] > cases["lora"]["flops_per_token"] > 0
    assert cases["lora"]["attn"] == "affinage_varlen"
    assert "skipped" in cases["qlora"] or cases["qlora"]["tokens_per_s"] > 0
    assert cases["parity"]["equal"] and cases["parity"]["segments"] >= 2
