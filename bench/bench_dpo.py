#!/usr/bin/env python
"""DPO throughput: TRL's DPOTrainer with its defaults (a) against affinage's DPO glue (c), one process, one run.

The same tiny Llama (same weights, the demo's tokenizer and ChatML template), the same French pairs
(recipes/demo/data/preferences.jsonl), global batch, max_length, learning rate, steps and seed.
Repeats are interleaved (a c a c ...). What differs is only what each side does by default:

- (a) TRL ``DPOConfig`` defaults (gradient checkpointing on, reference = a second copy of the model,
  the dataset tokenized by TRL in the trainer's constructor, every run);
- (c) ``affinage train`` of a ``task: dpo`` recipe with LoRA off (full fine-tuning like (a),
  ``reference: frozen_copy``): pairs from the prepared cache (tokenized once, a cache hit afterwards), the
  recipe's training settings (no gradient checkpointing unless the recipe asks).

    python bench/bench_dpo.py                   # a few minutes on a 2-core CPU
    python bench/bench_dpo.py --quick           # seconds: the CI smoke check
    python bench/bench_dpo.py --json out.json   # also write the numbers

Printed per set-up: pairs/s over the timed steps (the first ``--warmup`` steps are not timed), the time
spent before training starts (model, reference and data preparation), peak RSS, final loss; then c/a.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "demo" / "data" / "preferences.jsonl"


class StepTimer:
    """A TrainerCallback timing the optimizer steps after ``warmup``."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == timer.warmup:
                    timer.t0 = time.perf_counter()
                timer.t1 = time.perf_counter()
                timer.steps = state.global_step

        self.warmup, self.t0, self.t1, self.steps = warmup, None, None, 0
        self.callback = _CB()

    def pairs_per_s(self, batch: int) -> float:
        timed = self.steps - self.warmup
        return timed * batch / (self.t1 - self.t0) if timed > 0 and self.t0 else float("nan")


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from affinage.model.load import load_tokenizer_folder
    import torch

    tok = load_tokenizer_folder(REPO / "recipes" / "demo" / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def raw_records(n: int) -> list[dict]:
    """The pairs as TRL's conversational format (what a TRL user feeds DPOTrainer)."""
    from affinage.data.preference import to_preference

    out = []
    for i, line in enumerate(DATA.read_text(encoding="utf-8").splitlines()[:n]):
        r = to_preference(json.loads(line), "preference", f"{DATA}:{i + 1}")
        out.append({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    return out


def run_trl(model_dir: Path, out: Path, a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from affinage.model.load import load_tokenizer_folder

    t0 = time.perf_counter()
    tok = load_tokenizer_folder(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    timer = StepTimer(a.warmup)
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=a.lr,
                     max_length=a.max_length, seed=a.seed, use_cpu=not torch.cuda.is_available(), bf16=False,
                     report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(raw_records(a.records)),
                         processing_class=tok, callbacks=[timer.callback])
    setup = time.perf_counter() - t0
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"pairs_per_s": timer.pairs_per_s(a.batch), "setup_s": setup, "final_loss": losses[-1] if losses else None,
            "gradient_checkpointing": bool(args.gradient_checkpointing), "reference": "second model (TRL default)",
            "peak_rss_gb": peak_rss_gb()}


def run_affinage(model_dir: Path, out: Path, cache: Path, a) -> dict:
    import torch

    from affinage.recipe.loader import load_recipe_dict
    from affinage.run import RunDir
    from affinage.train.tasks import train

    t0 = time.perf_counter()
    recipe = load_recipe_dict({
        "name": "bench-dpo", "task": "dpo", "seed": a.seed,
        "model": {"name_or_path": str(model_dir), "dtype": "float32"}, "method": {"kind": "full"},
        "preference": {"beta": 0.1, "reference": "frozen_copy"},
        "data": {"sources": [{"path": str(DATA), "format": "preference", "max_records": a.records}],
                 "max_length": a.max_length, "cache_dir": str(cache), "shuffle": False},
        "training": {"global_batch_size": a.batch, "micro_batch_size": a.batch, "duration": f"{a.steps} steps",
                     "learning_rate": a.lr, "lr_scheduler": "linear", "report_to": ["none"]},
        "output": {"dir": str(out)},
    })
    timer = StepTimer(a.warmup)
    marks = {}

    from transformers import TrainerCallback

    class Begin(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            marks["begin"] = time.perf_counter()

    result = train(recipe, RunDir.create(out), resume=False, callbacks=[timer.callback, Begin()])
    return {"pairs_per_s": timer.pairs_per_s(a.batch), "setup_s": marks.get("begin", t0) - t0, "final_loss": result.loss_last,
            "gradient_checkpointing": recipe.training.gradient_checkpointing, "reference": "frozen_copy",
            "peak_rss_gb": peak_rss_gb(), "cuda": torch.cuda.is_available()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--records", type=int, default=158)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.steps, a.warmup, a.records, a.hidden, a.layers = 1, 4, 1, 16, 64, 1
    sys.path.insert(0, str(REPO / "src"))
    runs: dict[str, list] = {"a": [], "c": []}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        tmp = Path(tmp)
        model_dir = make_model(tmp / "model", a.hidden, a.layers)
        for rep in range(a.repeats):
            runs["a"].append(run_trl(model_dir, tmp / f"trl-{rep}", a))
            runs["c"].append(run_affinage(model_dir, tmp / f"aff-{rep}", tmp / "cache", a))
    ratio = [c["pairs_per_s"] / x["pairs_per_s"] for c, x in zip(runs["c"], runs["a"])]
    res = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
           "settings": {k: v for k, v in vars(a).items() if k != "json"}, "runs": runs,
           "c_over_a": {"mean": statistics.mean(ratio), "min": min(ratio), "max": max(ratio)}}
    for k, label in (("a", "TRL DPOTrainer defaults"), ("c", "affinage task: dpo")):
        r = runs[k]
        print(f"({k}) {label:<26} {statistics.mean(x['pairs_per_s'] for x in r):8.2f} pairs/s   setup "
              f"{statistics.mean(x['setup_s'] for x in r):6.2f} s   peak RSS {max(x['peak_rss_gb'] for x in r):.2f} GB   "
              f"final loss {r[-1]['final_loss']:.4f}   grad. checkpointing {r[-1]['gradient_checkpointing']}")
    m = res["c_over_a"]
    print(f"c/a pairs/s: {m['mean']:.2f} (min {m['min']:.2f}, max {m['max']:.2f}) over {a.repeats} repeat(s)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
