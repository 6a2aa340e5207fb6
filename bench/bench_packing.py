#!/usr/bin/env python
"""Throughput benchmark: TRL SFTTrainer defaults (a), TRL with BFD packing (b), affinage (c).

One process, one run: the same tiny random-init Llama (same weights), the same real tokenizer
(Lucie-7B, 65k vocabulary), the same French data, global batch, sequence length and seeds for the
three set-ups; repeats are interleaved (a b c a b c ...) and the first steps of every run are
discarded. No sample attends to another in any set-up: (a) pads, (b) uses TRL's best-fit-decreasing
packing with restarted position ids (TRL's ``wrapped`` strategy leaks across samples, so it is not
used), (c) uses affinage's cache, padding-free rows, per-segment attention and the loss computed at
loss-bearing positions only. For SFT, TRL is given prompt/completion records so that it too trains on
the answers only (its ``completion_only_loss`` default): the three train on the same targets.

    python bench/bench_packing.py                    # full run (several minutes on a 2-core CPU)
    python bench/bench_packing.py --quick            # seconds: the CI smoke check
    python bench/bench_packing.py --json out.json    # also write the numbers

Printed per set-up and task: samples/s (and the time to get through the N samples), non-pad tokens/s,
loss-bearing tokens per sample, padding fraction of computed tokens, peak RSS during the run, final
loss; then c/a and c/b on samples/s (mean and min–max over repeats); tokenization throughput of
``affinage prepare`` (tokens/s per process) and the cache-hit time. On a GPU it also prints MFU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AFFINAGE_SHARED") or REPO.parent / "shared")


# --------------------------------------------------------------------------------- measurement
class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


class BatchRecorder:
    """Records samples, real tokens, computed tokens and loss tokens of every micro-batch a trainer steps on.

    Hooked on ``Trainer.training_step`` (not on the collator, which the data loader calls a batch ahead).
    """

    def __init__(self, trainer):
        self.pending: list[dict] = []
        step = trainer.training_step

        def recorded(model, inputs, *args, **kwargs):
            self.observe(inputs)
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = recorded

    def observe(self, b) -> None:
        ids = b["input_ids"]
        labels = b["labels"]
        if "position_ids" in b and "attention_mask" not in b:  # padding-free: one flattened row
            samples = int((b["position_ids"] == 0).sum())
            real = computed = ids.numel()
        else:
            computed = ids.numel()
            real = int(b["attention_mask"].sum())
            samples = ids.shape[0]
        self.pending.append({"samples": samples, "real": real, "computed": computed,
                             "loss": int((labels[..., 1:] != -100).sum())})


def step_timer(recorder: BatchRecorder, warmup: int):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.last = None

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()
            self.last_cpu = time.process_time()  # every thread of this process: robust to other load on the machine

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            batches, recorder.pending = recorder.pending, []
            rec = {k: sum(b[k] for b in batches) for k in ("samples", "real", "computed", "loss")}
            cpu = time.process_time()
            rec["seconds"], rec["cpu_seconds"] = now - self.last, cpu - self.last_cpu
            self.steps.append(rec)
            self.last, self.last_cpu = now, cpu

        def summary(self, warm=warmup):
            use = self.steps[warm:] or self.steps[-1:]
            t = sum(s["seconds"] for s in use)
            cpu = sum(s["cpu_seconds"] for s in use)
            tot = {k: sum(s[k] for s in use) for k in ("samples", "real", "computed", "loss")}
            return {
                "steps_measured": len(use),
                "seconds": t,
                "samples_per_s": tot["samples"] / t,
                "cpu_seconds": cpu,
                "samples_per_cpu_s": tot["samples"] / cpu,
                "tokens_per_s": tot["real"] / t,
                "loss_tokens_per_sample": tot["loss"] / max(1, tot["samples"]),
                "padding_fraction": 1 - tot["real"] / max(1, tot["computed"]),
                "s_per_step": t / len(use),
            }

    return Timer()


# ---------------------------------------------------------------------------------------- set-up
def load_records(path: Path, n: int) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) >= n:
                break
    return out


def tiny_llama(vocab: int, layers: int, hidden: int, seed: int, max_pos: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=max_pos, tie_word_embeddings=False, use_cache=False,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg)
    return cfg, {k: v.clone() for k, v in m.state_dict().items()}


def fresh_model(cfg, state, attn: str):
    import torch
    from transformers import LlamaForCausalLM

    cfg = cfg.__class__.from_dict(cfg.to_dict())
    cfg._attn_implementation = attn
    m = LlamaForCausalLM(cfg)
    m.load_state_dict(state)
    m.config.use_cache = False
    if torch.cuda.is_available():
        m = m.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    return m


def common_args(out: str, micro: int, accumulation: int, seed: int, epochs: float):
    import torch

    on_gpu = torch.cuda.is_available()
    return dict(output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
                num_train_epochs=epochs, learning_rate=5e-4, lr_scheduler_type="constant", logging_steps=1,
                save_strategy="no", report_to="none", seed=seed, data_seed=seed, use_cpu=not on_gpu, bf16=on_gpu,
                dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False)


def run_trl(kind: str, task: str, records, tok, cfg, state, a) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if task == "sft":
        rows = [{"prompt": [m for m in r["messages"] if m["role"] != "assistant"],
                 "completion": [m for m in r["messages"] if m["role"] == "assistant"]} for r in records]
    else:
        rows = [{"text": r["text"]} for r in records]
    ds = Dataset.from_list(rows)
    attn = "sdpa"
    if torch.cuda.is_available() and _has("flash_attn"):
        attn = "flash_attention_2"
    model = fresh_model(cfg, state, attn)
    packing = kind == "b"
    micro = 1 if packing else a.batch  # packed rows are flattened: one row per forward keeps TRL's dense mask small
    epochs = a.packed_epochs if packing else 1
    args = SFTConfig(**common_args(tempfile.mkdtemp(prefix=f"bench-{kind}-"), micro, a.batch // micro, a.seed, epochs),
                     max_length=a.max_length, packing=packing, packing_strategy="bfd", dataset_num_proc=None,
                     use_liger_kernel=_has("liger_kernel") and torch.cuda.is_available())
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    prep = time.perf_counter() - t0
    rec = BatchRecorder(trainer)
    timer = step_timer(rec, a.warmup)
    _quiet(trainer)
    trainer.add_callback(timer)
    with PeakRSS() as mem:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {**timer.summary(), "peak_rss_gb": mem.peak / 2**30, "final_loss": losses[-1] if losses else None,
           "data_prep_s": prep, "steps": len(timer.steps), "attn": attn, "micro_batch": micro}
    del trainer, model
    gc.collect()
    return out


def run_affinage(task: str, cache, tok, cfg, state, a) -> dict:
    import torch
    from transformers import TrainingArguments

    from affinage.data.collator import PackedCollator, PackedDataset
    from affinage.train.attention import use_varlen_attention
    from affinage.train.loss import AffinageTrainer

    attn = "sdpa"
    if torch.cuda.is_available() and _has("flash_attn"):
        attn = "flash_attention_2"
    model = fresh_model(cfg, state, attn)
    impl = use_varlen_attention(model, a.max_length)
    micro = a.batch if task == "sft" else a.cpt_micro
    args = TrainingArguments(**common_args(tempfile.mkdtemp(prefix="bench-c-"), micro, a.batch // micro, a.seed, a.packed_epochs),
                             remove_unused_columns=False)
    trainer = AffinageTrainer(model=model, args=args, train_dataset=PackedDataset(cache.train),
                              data_collator=PackedCollator(tok.pad_token_id, task=task))
    rec = BatchRecorder(trainer)
    timer = step_timer(rec, a.warmup)
    _quiet(trainer)
    trainer.add_callback(timer)
    with PeakRSS() as mem:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {**timer.summary(), "peak_rss_gb": mem.peak / 2**30, "final_loss": losses[-1] if losses else None,
           "steps": len(timer.steps), "attn": impl, "micro_batch": micro}
    del trainer, model
    gc.collect()
    return out


def _quiet(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def mfu(result: dict, cfg) -> float | None:
    """Model FLOPs utilisation on GPU: 6N per trained token (full fine-tuning) plus attention, over peak bf16."""
    import torch

    if not torch.cuda.is_available():
        return None
    n_params = cfg.num_hidden_layers * (4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size) \
        + cfg.vocab_size * cfg.hidden_size  # LM head (the embedding lookup costs no FLOPs)
    seq = result.get("tokens_per_s", 0) / max(result.get("samples_per_s", 1e-9), 1e-9)
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq  # per token, causal average over the sample
    flops = result["tokens_per_s"] * (6 * n_params + attn)
    name = torch.cuda.get_device_name(0)
    peak = 989e12 if "H100" in name or "H200" in name else 312e12  # dense bf16: H100/H200 SXM, else A100
    return flops / peak


# ------------------------------------------------------------------------------------------ main
def prepare_cache(task: str, path: Path, n: int, tok_dir: Path, a, cache_dir: str):
    from affinage.data.prepare import prepare
    from affinage.recipe.schema import Recipe

    recipe = Recipe.model_validate({
        "name": f"bench-{task}", "task": task, "seed": a.seed,
        "model": {"name_or_path": str(tok_dir)},
        "data": {"sources": [{"path": str(path), "max_records": n}], "max_length": a.max_length,
                 "packing": "bfd" if task == "sft" else a.cpt_packing, "cache_dir": cache_dir},
        "training": {"global_batch_size": a.batch, "duration": "1 epochs"},
    })
    built = prepare(recipe, progress=False)
    hit = prepare(recipe, progress=False)
    return built, hit


def tokenization_throughput(tok_dir: Path, a, cache_dir: str) -> list[dict]:
    """affinage prepare on the whole shared corpora (cache miss): tokens/s per process, rows, hit time."""
    from affinage.data.prepare import prepare
    from affinage.recipe.schema import Recipe

    out = []
    for task, files in (("sft", ["fr_instruct_piaf_qa.jsonl"]), ("cpt", ["fr_legal_codes.jsonl", "fr_literature_roman19.jsonl"])):
        recipe = Recipe.model_validate({
            "name": f"tok-{task}", "task": task, "seed": a.seed, "model": {"name_or_path": str(tok_dir)},
            "data": {"sources": [{"path": str(SHARED / "data" / f), **({"max_records": a.tok_records} if a.tok_records else {})}
                                 for f in files],
                     "max_length": a.max_length, "packing": "bfd" if task == "sft" else a.cpt_packing, "cache_dir": cache_dir},
            "training": {"global_batch_size": a.batch, "duration": "1 epochs"},
        })
        built = prepare(recipe, progress=False)
        t = time.perf_counter()
        hit = prepare(recipe, progress=False)
        hit_s = time.perf_counter() - t
        st = built.stats
        out.append({"task": task, "files": files, "tokens": st["tokenization"]["tokens"],
                    "num_proc": st["tokenization"]["num_proc"],
                    "tokens_per_s": st["tokenization"]["tokens_per_second"],
                    "tokens_per_s_per_process": st["tokenization"]["tokens_per_second_per_process"],
                    "build_s": st["seconds"]["total"], "hit_s": hit_s, "hit": hit.hit,
                    "rows": st["packing"]["train"]["rows"], "row_fill": st["packing"]["train"]["row_fill"],
                    "padding_fraction": st["padding_fraction"]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "lucie-7b-instruct"))
    p.add_argument("--sft-data", default=str(SHARED / "data" / "fr_instruct_piaf_qa.jsonl"))
    p.add_argument("--cpt-data", default=str(SHARED / "data" / "fr_legal_codes.jsonl"))
    p.add_argument("--sft-samples", type=int, default=96)
    p.add_argument("--cpt-samples", type=int, default=48)
    p.add_argument("--tasks", default="sft,cpt")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per optimizer step) for every set-up")
    p.add_argument("--cpt-micro", type=int, default=2, help="affinage CPT micro-batch (rows per forward)")
    p.add_argument("--cpt-packing", default="bfd", choices=["bfd", "concat"])
    p.add_argument("--packed-epochs", type=float, default=4, help="epochs over the N samples for (b) and (c) (more steps to measure)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="steps discarded at the start of every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tok-records", type=int, default=0, help="records per corpus for the tokenization measure (0: all)")
    p.add_argument("--skip-tokenization", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check of the whole script")
    p.add_argument("--json", help="write all numbers to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.sft_samples, a.cpt_samples, a.max_length, a.batch, a.cpt_micro = 6, 4, 256, 2, 1
        a.layers, a.hidden, a.repeats, a.warmup, a.packed_epochs, a.tok_records = 1, 64, 1, 1, 2, 20

    import torch

    from affinage.model.load import load_tokenizer_folder

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    tok = load_tokenizer_folder(a.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg, state = tiny_llama(len(tok), a.layers, a.hidden, a.seed, max(4096, a.max_length))
    n_params = sum(v.numel() for v in state.values())
    machine = (f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"
               + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"))
    print(f"machine: {machine}; torch {torch.__version__}; model: Llama {a.layers}x{a.hidden}, vocab {len(tok)}, "
          f"{n_params / 1e6:.1f}M parameters; L={a.max_length}, global batch {a.batch} sequences, repeats {a.repeats}, "
          f"warm-up {a.warmup} steps discarded", flush=True)

    cache_dir = tempfile.mkdtemp(prefix="bench-cache-")
    results: dict = {"machine": machine, "args": vars(a), "runs": {}, "ratios": {}}
    for task in a.tasks.split(","):
        path = Path(a.sft_data if task == "sft" else a.cpt_data)
        n = a.sft_samples if task == "sft" else a.cpt_samples
        records = load_records(path, n)
        built, hit = prepare_cache(task, path, n, Path(a.tokenizer), a, cache_dir)
        print(f"\n[{task}] {n} samples of {path.name}: affinage cache {built.train.num_tokens} tokens in {len(built.train)} rows "
              f"(built {built.seconds:.2f} s, hit {hit.seconds * 1000:.0f} ms)", flush=True)
        runs = {"a": [], "b": [], "c": []}
        for rep in range(a.repeats):
            for kind in ("a", "b", "c"):
                if kind == "c":
                    r = run_affinage(task, hit, tok, cfg, state, a)
                else:
                    r = run_trl(kind, task, records, tok, cfg, state, a)
                r["mfu"] = mfu(r, cfg)
                runs[kind].append(r)
                print(f"  rep {rep} {kind}: {r['samples_per_s']:.2f} samples/s, {r['s_per_step']:.2f} s/step, "
                      f"{r['steps']} steps", flush=True)
        results["runs"][task] = runs
        _report(task, n, runs, results)
    if not a.skip_tokenization:
        tokr = tokenization_throughput(Path(a.tokenizer), a, cache_dir)
        results["tokenization"] = tokr
        print("\naffinage prepare (cache miss, then hit):")
        for t in tokr:
            print(f"  {t['task']}: {t['tokens']:,} tokens, {t['tokens_per_s']:,.0f} tok/s on {t['num_proc']} processes "
                  f"= {t['tokens_per_s_per_process']:,.0f} tok/s per core; build {t['build_s']:.1f} s; "
                  f"cache hit {t['hit_s'] * 1000:.0f} ms; {t['rows']} rows, row fill {t['row_fill']:.4f}, "
                  f"padding computed on {t['padding_fraction']:.3%}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def _report(task: str, n: int, runs: dict, results: dict) -> None:
    names = {"a": "TRL defaults (no packing)", "b": "TRL packing=bfd", "c": "affinage"}
    print(f"\n[{task}] mean over repeats")
    print(f"  {'set-up':<27}{'samples/s':>10}{'time N':>9}{'tok/s':>9}{'loss tok/smp':>13}{'padding':>9}{'peak RSS':>10}{'final loss':>11}  attention")
    for k in ("a", "b", "c"):
        rs = runs[k]
        m = lambda key: statistics.mean(r[key] for r in rs)  # noqa: E731
        print(f"  {names[k]:<27}{m('samples_per_s'):>10.2f}{n / m('samples_per_s'):>8.1f}s{m('tokens_per_s'):>9.0f}"
              f"{m('loss_tokens_per_sample'):>13.1f}{m('padding_fraction'):>9.1%}{max(r['peak_rss_gb'] for r in rs):>8.2f}GB"
              f"{rs[-1]['final_loss'] or float('nan'):>11.3f}  {rs[-1]['attn']} (micro-batch {rs[-1]['micro_batch']})"
              + (f"  MFU {m('mfu'):.1%}" if rs[-1].get("mfu") is not None else ""))
    for num, den in (("c", "a"), ("c", "b")):
        ratios = [c["samples_per_s"] / d["samples_per_s"] for c, d in zip(runs[num], runs[den])]
        results["ratios"][f"{task} {num}/{den}"] = ratios
        print(f"  {num}/{den} samples/s: {statistics.mean(ratios):.2f}  (min {min(ratios):.2f}, max {max(ratios):.2f}, "
              f"{len(ratios)} repeats)")


if __name__ == "__main__":
    sys.exit(main())
