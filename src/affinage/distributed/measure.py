"""Measure each strategy on this machine: step time, memory per process, against the plan's estimate.

    python -m affinage.distributed.measure [--nproc 2] [--hidden 512 --layers 8] [--strategies ddp,fsdp2,...] [--out DIR]

Builds a random-init Llama of the given size (tokenizer of the demo), trains it ``--steps`` steps
with ``affinage train --nproc N`` under every strategy, and prints one row per strategy:

- step time (median of the logged steps after the first, from ``metrics.jsonl``);
- model states per process, counted storage by storage by every rank (weights + optimizer states +
  DeepSpeed master copies), against the estimate's weights + optimizer terms;
- peak resident memory during the training steps (the kernel's peak-RSS counter is reset when
  training begins, so loading and the final save are left out) minus the RSS before the model
  loaded, largest rank,
  against the estimate's total (weights, gradients, optimizer, activations, logits). On CPU this
  includes allocator slack and communication buffers the estimate leaves out; on a GPU read
  ``cuda_max_allocated`` in ``RUN_DIR/distributed/runtime.json`` instead.

The figures in the README were produced with this command (2 cores, torch 2.13 CPU, gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from affinage.resources import resource_dir

DEMO = resource_dir("recipes") / "demo"  # the demo tokenizer and corpus


def build_model(folder: Path, hidden: int, layers: int, intermediate: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok_dir = DEMO / "model"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64), max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def write_recipe(folder: Path, model: Path, strategy: str, steps: int, seq: int, micro: int, nproc: int, ckpt: bool = False) -> Path:
    data = DEMO / "data"
    path = folder / f"{strategy}.yaml"
    path.write_text(f"""name: measure-{strategy}
task: cpt
seed: 1
model: {{name_or_path: {model}, dtype: float32}}
method: {{kind: full}}
data:
  sources:
    - {{path: {data / 'culture_generale.jsonl'}, format: text}}
    - {{path: {data / 'histoire.jsonl'}, format: text}}
  max_length: {seq}
  packing: concat
training:
  global_batch_size: {micro * nproc}
  micro_batch_size: {micro}
  duration: {steps} steps
  learning_rate: 1e-3
  lr_scheduler: constant
  report_to: [none]
  gradient_checkpointing: {str(ckpt).lower()}
distributed: {{strategy: {strategy}}}
output: {{dir: {folder / strategy}}}
""", encoding="utf-8")
    return path


def measure(strategy: str, folder: Path, model: Path, args) -> dict:
    from affinage.distributed.launch import launch_env
    from affinage.plan import make_plan
    from affinage.recipe.loader import load_recipe

    recipe_path = write_recipe(folder, model, strategy, args.steps, args.seq, args.micro, args.nproc, args.gradient_checkpointing)
    run = folder / strategy
    cmd = [sys.executable, "-m", "affinage.cli", "train", str(recipe_path), "--nproc", str(args.nproc), "--run-dir", str(run)]
    env = launch_env(args.nproc)
    # glibc: serve tensors of 64 KiB and more with mmap and give them back on free, so that RSS follows
    # the live tensors instead of keeping every freed block (without this, peaks read 25-50 % high)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"strategy": strategy, "error": (proc.stdout + proc.stderr)[-2000:]}
    report = json.loads((run / "distributed" / "runtime.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["train_runtime"] for r in rows if "train_runtime" in r and "loss" in r]
    steps = [r["step"] for r in rows if "train_runtime" in r and "loss" in r]
    per_step = [(t2 - t1) / (s2 - s1) for (t1, s1), (t2, s2) in zip(zip(times, steps), zip(times[1:], steps[1:])) if s2 > s1]
    recipe = load_recipe(recipe_path, world_size=args.nproc)
    est = make_plan(recipe, world_size=args.nproc, count_data=False).memory
    ranks = report["end"]
    states = max(r["model_state_bytes"]["weights"] + r["model_state_bytes"]["optimizer"] for r in ranks)
    # peak during the training steps (kernel counter reset at train begin), above the process before the model loaded
    peak = max((r["peak_rss_training"] or r["peak_rss_bytes"]) - r["rss_before_model"] for r in ranks)
    return {
        "strategy": strategy,
        "world_size": report["world_size"],
        "engine": ranks[0]["engine"],
        "step_s": statistics.median(per_step) if per_step else None,
        "states_measured": states,
        # at the end of a step: shards (not the gathered working set), optimizer states, offloaded copies of both
        "states_estimated": est.weights - est.working_set + est.optimizer + est.cpu_weights + est.cpu_optimizer,
        "peak_rss_delta": peak,
        "estimate_total": est.total + est.cpu_offloaded,  # on CPU, "offloaded" RAM is the same RAM
        "estimate": est.as_dict(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--strategies", default="ddp,fsdp2,zero2,zero3,zero3_offload")
    p.add_argument("--gradient-checkpointing", action="store_true", help="training.gradient_checkpointing: true")
    p.add_argument("--out", help="folder for the runs (default: a temporary folder)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(args.out or tempfile.mkdtemp(prefix="affinage-measure-"))
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(folder / "model", args.hidden, args.layers, args.intermediate or 3 * args.hidden)
    from affinage.distributed.memory import human_bytes

    results = []
    print(f"{'strategy':<14} {'step':>8} {'states meas.':>13} {'states est.':>12} {'err':>6} {'peak Δ RSS':>11} {'est. total':>11} {'err':>6}")
    for strategy in args.strategies.split(","):
        r = measure(strategy, folder, model, args)
        results.append(r)
        if "error" in r:
            print(f"{strategy:<14} failed: {r['error'][-300:]}")
            continue
        e1 = (r["states_estimated"] - r["states_measured"]) / r["states_measured"]
        e2 = (r["estimate_total"] - r["peak_rss_delta"]) / r["peak_rss_delta"]
        print(f"{strategy:<14} {r['step_s']:>7.3f}s {human_bytes(r['states_measured']):>13} {human_bytes(r['states_estimated']):>12} "
              f"{100 * e1:>5.0f}% {human_bytes(r['peak_rss_delta']):>11} {human_bytes(r['estimate_total']):>11} {100 * e2:>5.0f}%")
    (folder / "measure.json").write_text(json.dumps(results, indent=1))
    print(f"details: {folder / 'measure.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
