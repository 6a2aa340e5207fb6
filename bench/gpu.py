#!/usr/bin/env python
"""The GPU run, prepared: one command, one JSON, ≤ 8 minutes on one H100/H200.

On a random-init Llama-3-8B-shaped model (32×4096, GQA 8 KV heads, 14,336 MLP, 128k vocabulary;
bf16), packed rows of 4,096 tokens of random segments (every token a target, CPT-like), through
affinage's own path (``model.load.load_model``, ``AffinageTrainer``, ``PackedCollator``):

- tokens/s and MFU (``affinage.plan.training_flops_per_token`` / ``mfu``: the same FLOPs formula as
  ``affinage plan``) of LoRA and full fine-tuning, each with kernels off (``training.kernels.liger off``,
  plain head + cross-entropy) and on (``liger auto``: Liger RMSNorm/RoPE/SwiGLU when installed, through
  ``affinage.train.kernels`` as a run does, + ``training.loss.kind chunked``, i.e. Cut Cross-Entropy or
  Liger's fused linear CE when installed); ``lora-compile``: the LoRA kernels case with
  ``training.kernels.compile on`` (compile time is in its ``seconds``; ``--dry`` uses dynamo's eager
  backend, which checks the wiring, not inductor); attention: flash-attention 2 varlen when
  ``flash_attn`` is installed, else affinage's per-segment SDPA;
- QLoRA 4-bit (bitsandbytes nf4) tokens/s;
- packed == unpacked: per-token losses of a packed row vs its segments run alone (max |Δ|);
- peak memory (``torch.cuda.max_memory_allocated``) vs ``affinage plan``'s estimate for the same job;
- TRL ``SFTTrainer`` at its best on the same LoRA job (packing bfd / padding-free, its compact fused
  head, flash-attention and Liger when installed).

    python bench/gpu.py --out gpu.json          # on the GPU machine
    python bench/gpu.py --dry --out dry.json    # CPU, tiny shapes, seconds: CI (tests/bench/test_gpu_dry.py)

Every case runs in this process one after the other; a case that fails records its error and the
others still run (the JSON says which).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=1024)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def gpu_kind() -> str | None:
    """This GPU as a key of ``affinage.plan.PEAK_BF16_FLOPS`` (None on CPU or an unknown GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).lower()
    for kind in ("h200", "h100", "a100", "l40s", "a10", "rtx4090"):
        if kind.replace("rtx", "") in name:
            return {"a100": "a100-80"}.get(kind, kind)
    return None


def make_rows(vocab: int, length: int, n_rows: int, seed: int) -> list[dict]:
    """Packed rows of random segments (lengths 1/8 to 1/2 of the row), every token a target."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        seqs, left = [], length
        while left > 0:
            n = min(left, int(rng.integers(length // 8, length // 2 + 1)))
            seqs.append(n)
            left -= n
        ids = rng.integers(3, vocab, size=length, dtype=np.int64)
        mask = np.ones(length, dtype=bool)
        starts = np.cumsum([0] + seqs[:-1])
        mask[starts] = False  # a segment's first token has no prediction inside the segment
        rows.append({"input_ids": ids, "loss_mask": mask, "seq_lens": np.asarray(seqs, dtype=np.int64)})
    return rows


def save_random_model(folder: Path, shape: dict, dtype, device: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    cfg = LlamaConfig(**shape, tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(str(folder))
    del model
    # a word-level tokenizer with the model's vocabulary size: the rows are token ids already
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(shape["vocab_size"])},
                                                                                unk_token="t0")),
                                  bos_token="t0", eos_token="t1", pad_token="t2", unk_token="t0")
    tok.save_pretrained(str(folder))
    return folder


def recipe_for(folder: Path, method: str, a, kernels: bool, data_file: Path, compile_: bool = False):
    from affinage.recipe.schema import Recipe

    on_gpu = not a.dry
    attn = "flash_attention_2" if on_gpu and _has("flash_attn") else "sdpa"
    return Recipe.model_validate({
        "name": f"gpu-{method}{'-kernels' if kernels else ''}{'-compile' if compile_ else ''}", "task": "cpt", "seed": 0,
        "model": {"name_or_path": str(folder), "dtype": "bfloat16" if on_gpu else "float32", "attn_implementation": attn},
        "method": {"kind": method, **({"lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                                                "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}
                                      if method != "full" else {})},
        "data": {"sources": [{"path": str(data_file)}], "max_length": a.length},
        "training": {"global_batch_size": a.accumulation, "micro_batch_size": 1, "duration": f"{a.steps} steps",
                     "gradient_checkpointing": method == "full" and on_gpu, "optimizer": "adamw_torch",
                     "loss": {"kind": "chunked" if kernels else "plain"},
                     "kernels": {"liger": "auto" if kernels else "off", "compile": "on" if compile_ else "off"}},
    })


def train_case(name: str, folder: Path, method: str, kernels: bool, rows: list[dict], a, data_file: Path,
               compile_: bool = False) -> dict:
    import torch
    from transformers import TrainingArguments

    import bench_packing as bp
    from affinage.data.collator import PackedCollator
    from affinage.model.load import load_model
    from affinage.plan import make_plan, mfu, training_flops_per_token
    from affinage.train.attention import use_varlen_attention
    from affinage.train.kernels import apply_kernels
    from affinage.train.loss import AffinageTrainer

    recipe = recipe_for(folder, method, a, kernels, data_file, compile_)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_model(recipe, device_map={"": 0} if on_gpu and method != "qlora" else None)
    attn = use_varlen_attention(model, a.length)
    t = recipe.training
    chosen = apply_kernels(model, t.kernels)  # the run's own path: Liger on this instance, compile via the arguments
    compile_args = chosen.training_arguments()
    if compile_args and a.dry:
        compile_args["torch_compile_backend"] = "eager"  # CI: dynamo traces the real path; inductor's C++ build is minutes
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix=f"gpu-{name}-"), per_device_train_batch_size=1,
                             gradient_accumulation_steps=a.accumulation, max_steps=a.warmup + a.steps, learning_rate=1e-4,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                             bf16=on_gpu, use_cpu=not on_gpu, remove_unused_columns=False, dataloader_num_workers=0,
                             disable_tqdm=True, gradient_checkpointing=t.gradient_checkpointing,
                             gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
                             **compile_args)
    trainer = AffinageTrainer(model=model, args=args, train_dataset=rows, data_collator=PackedCollator(2, task="cpt"),
                              loss_spec=t.loss)
    bp._quiet(trainer)
    rec = bp.BatchRecorder(trainer)
    timer = bp.step_timer(rec, a.warmup)
    trainer.add_callback(timer)
    trainer.train()
    s = timer.summary(a.warmup)
    cfg = model.config
    from affinage.plan import _linear_params

    seg = sum(len(r["seq_lens"]) for r in rows) and sum(int(x) for r in rows for x in r["seq_lens"]) / sum(len(r["seq_lens"]) for r in rows)
    flops = training_flops_per_token(linear_params=_linear_params(model), layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                                     seq_len=int(seg), lora=method != "full")
    kind = gpu_kind()
    peak = torch.cuda.max_memory_allocated() if on_gpu else None
    try:
        plan = make_plan(recipe, count_data=False, gpu=kind)
        est = plan.memory.total
    except Exception as e:  # the plan must not hide the measurement
        est = f"plan failed: {e}"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {"case": name, "method": method, "kernels": kernels, "liger": chosen.liger.on, "liger_why": chosen.liger.why,
           "liger_modules": chosen.liger_modules, "compile": chosen.compile.on,
           "compile_backend": compile_args.get("torch_compile_backend", "inductor") if compile_args else None,
           "model_wrapped": type(trainer.model_wrapped).__name__, "attn": attn,
           "loss_backend": trainer.chunked["backend"] if trainer.chunked else "plain",
           "gradient_checkpointing": t.gradient_checkpointing, "tokens_per_s": s["tokens_per_s"], "s_per_step": s["s_per_step"],
           "steps_measured": s["steps_measured"], "flops_per_token": flops, "mfu": mfu(s["tokens_per_s"], flops, kind) if kind else None,
           "peak_memory_bytes": peak, "plan_estimate_bytes": est,
           "peak_over_plan": (peak / est) if (peak and isinstance(est, (int, float)) and est) else None,
           "final_loss": losses[-1] if losses else None}
    del trainer, model
    gc.collect()
    return out


def packed_vs_unpacked(folder: Path, a, data_file: Path) -> dict:
    """Per-token losses of one packed row vs each segment alone (same weights, no grad)."""
    import torch
    import torch.nn.functional as F

    from affinage.data.collator import PackedCollator
    from affinage.model.load import load_model
    from affinage.train.attention import use_varlen_attention

    recipe = recipe_for(folder, "full", a, False, data_file)
    on_gpu = torch.cuda.is_available()
    model = load_model(recipe, device_map={"": 0} if on_gpu else None).eval()
    attn = use_varlen_attention(model, a.length)
    dev = next(model.parameters()).device
    row = make_rows(model.config.vocab_size, a.length, 1, seed=7)[0]
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in PackedCollator(2, task="cpt")([row]).items()}

    def token_losses(b):
        inputs = {k: v for k, v in b.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits.float()
        lab = b["labels"][:, 1:]
        lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100, reduction="none")
        return lp[lab.reshape(-1) != -100]

    with torch.no_grad():
        packed = token_losses(batch)
        alone, pos = [], 0
        for n in row["seq_lens"].tolist():
            ids = torch.as_tensor(row["input_ids"][pos:pos + n], device=dev)[None]
            alone.append(token_losses({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}))
            pos += n
        alone = torch.cat(alone)
    diff = float((packed - alone).abs().max())
    tol = 5e-2 if on_gpu else 1e-4  # bf16 kernels differ by rounding between one long and several short calls
    del model
    gc.collect()
    return {"attn": attn, "segments": len(row["seq_lens"]), "tokens": int(packed.numel()), "max_abs_diff": diff,
            "tolerance": tol, "equal": diff <= tol and packed.shape == alone.shape}


def trl_best(folder: Path, rows: list[dict], a) -> dict:
    """TRL SFTTrainer on the same LoRA job: packing bfd (padding-free), compact fused head, flash-attn/Liger if installed."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import bench_packing as bp

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        import trl.trainer.utils as tu

        tu._use_triton = lambda device: True  # compact head on CPU too (as in bench_sft.py)
    segs = []
    for r in rows:
        pos = 0
        for n in r["seq_lens"].tolist():
            segs.append({"input_ids": r["input_ids"][pos:pos + n].tolist()})
            pos += n
    attn = "flash_attention_2" if on_gpu and _has("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16 if on_gpu else torch.float32,
                                                 attn_implementation=attn, **({"device_map": {"": 0}} if on_gpu else {}))
    liger = on_gpu and _has("liger_kernel")
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="gpu-trl-"), per_device_train_batch_size=1,
                     gradient_accumulation_steps=a.accumulation, max_steps=a.warmup + a.steps, learning_rate=1e-4,
                     lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", bf16=on_gpu,
                     use_cpu=not on_gpu, max_length=a.length, packing=True, packing_strategy="bfd", use_liger_kernel=liger,
                     gradient_checkpointing=False, disable_tqdm=True, dataset_num_proc=None)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(segs),
                         processing_class=AutoTokenizer.from_pretrained(str(folder)),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    bp._quiet(trainer)
    rec = bp.BatchRecorder(trainer)
    timer = bp.step_timer(rec, a.warmup)
    trainer.add_callback(timer)
    trainer.train()
    s = timer.summary(a.warmup)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {"case": "trl-lora", "attn": attn, "liger": liger, "tokens_per_s": s["tokens_per_s"], "s_per_step": s["s_per_step"],
           "steps_measured": s["steps_measured"], "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
           "final_loss": losses[-1] if losses else None}
    del trainer, model
    gc.collect()
    return out


DEFAULT_CASES = "lora,lora-kernels,full,full-kernels,qlora,parity,lora-compile,trl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes: checks the whole script (CI)")
    p.add_argument("--out", default="gpu.json")
    p.add_argument("--length", type=int, default=4096, help="tokens per packed row")
    p.add_argument("--accumulation", type=int, default=2, help="rows per optimizer step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="measured optimizer steps per case")
    p.add_argument("--cases", default=None, help=f"comma list (default {DEFAULT_CASES}; --dry leaves out lora-compile, "
                   "~45 s of dynamo tracing on 2 cores: tests/bench/test_gpu_dry.py runs it alone, marked slow). trl last: its "
                   "use_liger_kernel rebinds modeling_llama's classes for the rest of the process")
    p.add_argument("--workdir", help="where the random model is saved (default: a temporary folder)")
    a = p.parse_args(argv)
    import torch

    if a.cases is None:
        a.cases = ",".join(c for c in DEFAULT_CASES.split(",") if not (a.dry and c == "lora-compile"))
    if a.dry:
        a.length, a.accumulation, a.warmup, a.steps = 64, 1, 1, 1
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run with --dry on CPU")
    t0 = time.perf_counter()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="affinage-gpu-"))
    shape = TINY if a.dry else LLAMA3_8B
    folder = save_random_model(work / "model", shape, torch.float32 if a.dry else torch.bfloat16, "cpu" if a.dry else "cuda")
    data_file = work / "unused.jsonl"  # the recipe needs a source; rows are built in memory
    data_file.write_text('{"text": "x"}\n')
    rows = make_rows(shape["vocab_size"], a.length, a.accumulation * (a.warmup + a.steps), seed=0)
    result = {"dry": a.dry, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "gpu_kind": gpu_kind(),
              "torch": torch.__version__, "host": platform.node(), "shape": shape, "row_tokens": a.length,
              "rows_per_step": a.accumulation, "installed": {m: _has(m) for m in ("flash_attn", "liger_kernel", "cut_cross_entropy", "bitsandbytes")},
              "cases": {}}
    for case in a.cases.split(","):
        c0 = time.perf_counter()
        try:
            if case == "parity":
                r = packed_vs_unpacked(folder, a, data_file)
            elif case == "trl":
                r = trl_best(folder, rows, a)
            elif case == "qlora" and not (torch.cuda.is_available() or _has("bitsandbytes")):
                r = {"skipped": "bitsandbytes not installed"}
            else:
                method = case.split("-")[0]
                compiled = case.endswith("-compile")
                r = train_case(case, folder, method, case.endswith("-kernels") or compiled, rows, a, data_file, compile_=compiled)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        r["seconds"] = time.perf_counter() - c0
        result["cases"][case] = r
        msg = r.get("error") or r.get("skipped") or ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                             for k, v in r.items() if k in ("tokens_per_s", "mfu", "max_abs_diff", "peak_over_plan"))
        print(f"{case}: {msg} ({r['seconds']:.0f} s)", flush=True)
        Path(a.out).write_text(json.dumps(result, indent=2, default=str))  # partial results survive a timeout
    result["seconds"] = time.perf_counter() - t0
    Path(a.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {a.out} ({result['seconds']:.0f} s)")
    return 0 if not any("error" in r for r in result["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
