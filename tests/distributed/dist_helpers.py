"""Helpers of tests/distributed: real 2-process launches for the sharding strategies, and what they leave to assert on.

Every process pays ~12 s of imports on 2 cores, so launches are shared: one torchrun launch per
strategy (``tests/distributed/dist_driver.py``) trains an uninterrupted reference run *and* a run stopped at a
step and resumed, in the same process group, and is reused by every test that needs it
(session-scoped). Tests assert what really ran from ``RUN_DIR/distributed/runtime.json`` (written by
every rank: engine, ZeRO stage, optimizer classes, local vs full parameter counts, DTensor
placements, checksums of local values), never from an exit code.

``slow`` tests (``AFFINAGE_SLOW=1`` runs them) are the long variants: ZeRO-3 with CPU offload
(DeepSpeed compiles its CPU Adam, ~95 s the first time), 1 → 2 resumes, LoRA under FSDP2, every
strategy through SLURM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "dist_driver.py"
LAUNCH_TIMEOUT = 420

STRATEGIES = ["ddp", "fsdp2", "zero2", "zero3"]
DEEPSPEED = {"zero2", "zero3", "zero3_offload"}

slow = pytest.mark.slow
run_slow = slow  # tests/conftest.py skips every ``slow`` test unless AFFINAGE_SLOW=1


def needs(strategy: str):
    if strategy in DEEPSPEED:
        pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install 'affinage[deepspeed]')")


def write_recipe(folder: Path, model_dir: Path, data: Path, *, strategy: str = "ddp", kind: str = "full",
                 steps: int = 6, extra: str = "") -> Path:
    """A tiny CPT recipe: 4 sequences per step (2 per process × 2, or 2 × accumulation 2 on one process).

    LoRA/QLoRA recipes also turn gradient checkpointing on (activation recomputation under sharding).
    """
    method = {"full": "method: {kind: full}",
              "lora": "method: {kind: lora, lora: {r: 8, alpha: 16, dropout: 0.0}}",
              "qlora": "method: {kind: qlora, lora: {r: 8, alpha: 16, dropout: 0.0}, quantization: {compute_dtype: float32}}",
              }[kind]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(f"""name: dist-{strategy}-{kind}
task: cpt
seed: 7
model: {{name_or_path: {model_dir}, dtype: float32}}
{method}
data:
  sources: [{{path: {data}, format: text, max_records: 48}}]
  max_length: 96
training:
  global_batch_size: 4
  micro_batch_size: 2
  duration: {steps} steps
  learning_rate: {"2e-3" if kind == "full" else "1e-2"}
  lr_scheduler: constant
  report_to: [none]
  save_every: 3
  keep_checkpoints: 3
  gradient_checkpointing: {"false" if kind == "full" else "true"}
distributed: {{strategy: {strategy}}}
{extra}
output: {{dir: {folder / 'run'}}}
""", encoding="utf-8")
    return path


def _env(nproc: int) -> dict:
    from affinage.distributed.launch import launch_env

    env = launch_env(nproc)
    env.pop("RANK", None), env.pop("LOCAL_RANK", None), env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return env


def _run(cmd: list[str], env: dict, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"{what} failed with exit code {proc.returncode}:\n{tail}")
    return proc


def launch_cli(recipe: Path, nproc: int, run_dir: Path, *sets: str, expect: int = 0) -> subprocess.CompletedProcess:
    """``affinage train RECIPE --nproc N``: the command a researcher types."""
    cmd = [sys.executable, "-m", "affinage.cli", "train", str(recipe), "--nproc", str(nproc), "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    env = _env(nproc)
    if expect == 0:
        return _run(cmd, env, f"affinage train --nproc {nproc}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == expect, (proc.returncode, (proc.stdout + proc.stderr)[-4000:])
    return proc


def launch_driver(recipe: Path, nproc: int, out: Path, *, ref: Path | None = None, cut: Path | None = None,
                  stop_at: int = 3, sets: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(DRIVER),
           str(recipe), "--out", str(out), "--stop-at", str(stop_at)]
    if ref:
        cmd += ["--ref", str(ref)]
    if cut:
        cmd += ["--cut", str(cut)]
    for s in sets:
        cmd += ["--set", s]
    _run(cmd, _env(nproc), f"torchrun driver ({nproc} processes)")
    return json.loads(out.read_text())


def runtime(run_dir: Path) -> dict:
    from affinage.distributed.runtime import read_runtime

    return read_runtime(run_dir)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (run_dir / "final" / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(run_dir / "final" / name)


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def reload_logits(run_dir: Path) -> torch.Tensor:
    """``final/`` loaded the way a user would: plain transformers (and peft for an adapter)."""
    from transformers import AutoModelForCausalLM

    from dist_driver import PROBE

    final = run_dir / "final"
    if (final / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE, use_cache=False).logits.float()


def copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> None:
    """A run directory holding only ``checkpoint-<step>`` of ``src_run`` (with its recipe, identity and metrics
    up to that step: what a run directory of affinage holds, or it is refused as someone else's)."""
    (dst_run / "checkpoints").mkdir(parents=True)
    for name in ("recipe.yaml", "identity.json"):
        if (src_run / name).is_file():
            shutil.copy2(src_run / name, dst_run / name)
    shutil.copytree(src_run / "checkpoints" / f"checkpoint-{step}", dst_run / "checkpoints" / f"checkpoint-{step}")
    rows = [line for line in (src_run / "metrics.jsonl").read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    (dst_run / "metrics.jsonl").write_text("\n".join(rows) + "\n")


@dataclass
class StrategyRuns:
    strategy: str
    recipe: Path
    ref: Path  # uninterrupted, 6 steps, checkpoints at 3 and 6
    cut: Path  # stopped after step 4 (STOP file at step 3), resumed in the same processes
    result: dict  # driver output: TrainResult of ref, cut_first, cut


class DistRuns:
    """One driver launch per strategy, on demand, shared by every test of the session."""

    def __init__(self, root: Path, model_dir: Path, data: Path):
        self.root, self.model_dir, self.data = root, model_dir, data
        self.cache: dict[str, StrategyRuns] = {}

    def get(self, strategy: str, kind: str = "full") -> StrategyRuns:
        key = f"{strategy}-{kind}"
        if key not in self.cache:
            needs(strategy)
            folder = self.root / key
            recipe = write_recipe(folder, self.model_dir, self.data, strategy=strategy, kind=kind)
            result = launch_driver(recipe, 2, folder / "driver.json", ref=folder / "ref", cut=folder / "cut")
            self.cache[key] = StrategyRuns(strategy, recipe, folder / "ref", folder / "cut", result)
        return self.cache[key]
