"""CI check of the GPU run (bench/gpu.py --dry): every case runs on CPU with tiny shapes and reports its numbers.

The figures mean nothing at this size; the test keeps the script from rotting until a GPU runs it:
every case (LoRA/full with kernels off and on, QLoRA when bitsandbytes is installed, packed vs
unpacked, TRL at its best) must produce a positive throughput, and packed rows must give the
per-token losses of their segments run alone (float32, within 1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from testlib import load_script

REPO = Path(__file__).resolve().parents[2]


def _gpu_module():
    gpu = load_script("bench/gpu.py")
    return gpu


def test_gpu_script_dry_runs_every_case(tmp_path):
    gpu = _gpu_module()
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
    # kernels through the recipe key (affinage.train.kernels): liger auto resolves off on CPU and says why
    assert not cases["lora-kernels"]["liger"] and "needs CUDA" in cases["lora-kernels"]["liger_why"]
    assert cases["lora"]["liger_why"] == "training.kernels.liger off"
    assert "skipped" in cases["qlora"] or cases["qlora"]["tokens_per_s"] > 0
    assert cases["parity"]["equal"] and cases["parity"]["segments"] >= 2


@pytest.mark.slow
def test_gpu_script_dry_compile_case(tmp_path):
    """~45 s on 2 cores: dynamo traces the LoRA kernels case (eager backend in --dry) through training.kernels.compile."""
    out = tmp_path / "dry.json"
    rc = _gpu_module().main(["--dry", "--cases", "lora-compile", "--out", str(out), "--workdir", str(tmp_path / "work")])
    case = json.loads(out.read_text())["cases"]["lora-compile"]
    assert rc == 0 and "error" not in case, case.get("error")
    assert case["compile"] and case["model_wrapped"] == "OptimizedModule" and case["compile_backend"] == "eager"
    assert case["tokens_per_s"] > 0 and case["final_loss"] is not None
