#!/usr/bin/env python
"""Side-by-side training throughput: every tool at its best settings for the device, same job.

Same model (one random-init Llama saved once, loaded by every set-up), same tokenizer (Lucie-7B, 65k
vocabulary), same records, same targets (SFT: the answers; CPT: every token), same global batch
(sequences or packed rows of ≤ L tokens per optimizer step), same learning rate and seed. Each run
is a fresh process (clean peak RSS, no warm caches carried over); repeats are interleaved
(A B C … A B C …). Rows:

- ``trl``: TRL ``SFTTrainer`` at its best for this device: ``packing=True, packing_strategy="bfd"``
  (padding-free, samples kept apart), its fused LM head in *compact* mode (only loss-bearing positions
  projected) forced on CPU — TRL 1.16 enables it only where Triton runs (``_use_triton(device)``:
  CUDA/XPU, ``trl/trainer/sft_trainer.py`` → ``add_fused_lm_head`` in ``trl/trainer/utils.py``), so the
  bench patches ``trl.trainer.utils._use_triton`` to answer True; the kernel's tile folding stays on
  its torch path. Liger kernels when installed and on CUDA. Gradient checkpointing off. One packed
  row per forward on CPU (TRL flattens a micro-batch and transformers builds a dense mask over it).
- ``trl-defaults``: ``SFTTrainer`` with its defaults (padded batches, full logits on CPU): the old headline.
- ``affinage``: its cache (BFD rows), padding-free micro-batches, per-segment attention, selective head.
- one row per affinage switch: ``affinage-no-selective`` (full logits), ``affinage-no-packing``
  (``packing: none``: one sample per row, still padding-free), ``affinage-chunked`` (CPT:
  ``training.loss.kind chunked``), ``affinage-no-lora-dropout`` (LoRA: ``lora_dropout`` 0 instead of
  the 0.05 every LoRA row uses: the cost of peft dropping each adapter's input separately); with
  ``--compile``, ``affinage-compile`` (``training.kernels.compile on``: the HF Trainer's ``torch_compile``
  through ``affinage.train.kernels``; compile time included).
- ``llamafactory`` / ``axolotl``: their own CLIs in their own venvs (``bench/peers/install.sh``), on the
  same model folder and records, with packing that keeps samples apart; if one is not installed or
  fails, the row says why (its last error line).

Printed per task: samples/s and loss-bearing tokens/s over the whole ``trainer.train()`` (the HF
Trainer's ``train_runtime``, the same clock for every tool), padding computed, peak RSS of the run's
process tree, final loss, each as min/median/max over repeats; the ratios affinage/row per repeat;
``/proc/loadavg`` sampled during every run.

    python bench/bench_sft.py --quick                      # seconds: smoke check
    python bench/bench_sft.py --json bench/results/sft.json  # the toy 4×256 model
    python bench/bench_sft.py --shape real --tasks lora-sft,sft,cpt  # 12×768 Llama, 65k vocabulary
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_packing as bp  # noqa: E402  (measurement helpers of the older bench)

REPO = HERE.parent
SHARED = bp.SHARED
PEERS = Path(os.environ.get("AFFINAGE_PEERS") or Path.home() / ".cache" / "affinage" / "peers")
MODELS = Path(os.environ.get("AFFINAGE_MODELS") or Path.home() / ".cache" / "affinage" / "models")
SHAPES = {  # layers, hidden, intermediate, heads, kv heads
    "toy": (4, 256, 1024, 4, 4),
    "real": (12, 768, 2048, 12, 4),  # SmolLM2-135M-like body (30×576 there) at CPU size, Lucie's 65k vocabulary
    "quick": (1, 64, 256, 1, 1),
}


# ------------------------------------------------------------------------------- measurement
class TreeMonitor:
    """Peak RSS of a process and its children, and /proc/loadavg, sampled every 100 ms while it runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.loads = pid, 0, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    @staticmethod
    def _children(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                for t in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{t}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
        return out

    def _rss(self) -> int:
        total = 0
        for p in self._children(self.pid):
            try:
                with open(f"/proc/{p}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                pass
        return total

    def _loop(self):
        n = 0
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._rss())
            n += 1
            if n % 10 == 0:
                self.loads.append(load1())

    def stop(self):
        self._stop.set()
        self._t.join()


def load1() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


def run_process(cmd: list[str], env: dict | None = None, cwd: str | None = None, timeout: float = 3600,
                keep_output: bool = False) -> dict:
    """Run ``cmd``; its last stdout line that is a JSON object is the result. Adds peak RSS and load."""
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    mon = TreeMonitor(p.pid)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        out += f"\nTIMEOUT after {timeout:.0f} s"
    mon.stop()
    res = None
    for line in reversed(out.splitlines()):
        if line.startswith("{") and line.endswith("}"):
            try:
                res = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if p.returncode != 0 or (res is None and not keep_output):
        errors = [l for l in out.splitlines() if "Error" in l or "error" in l or "TIMEOUT" in l] or out.splitlines()[-1:]
        res = {"error": (errors[-1] if errors else f"exit {p.returncode}").strip()[:400], "returncode": p.returncode}
    res = res or {}
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the waited-for tree: start-up, model load and training
    res.update(peak_rss_gb=mon.peak / 2**30, load_during=mon.loads or [load1()], wall_s=time.perf_counter() - t0,
               process_cpu_s=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime))
    if keep_output:
        res["_out"] = out
    return res


# ------------------------------------------------------------------------------------ set-up
def make_model_folder(dest: Path, tok_dir: Path, shape: str, seed: int, max_pos: int) -> Path:
    """One random-init Llama (fp32 safetensors) + the tokenizer, loaded by every set-up and peer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from affinage.model.load import load_tokenizer_folder

    tok = load_tokenizer_folder(str(tok_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    layers, hidden, inter, heads, kv = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_pos,
                      tie_word_embeddings=False, use_cache=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    return dest


def real_model_folder() -> Path | None:
    for root in (MODELS, Path.home() / ".cache" / "affinage" / "models"):
        p = root / "SmolLM2-135M-Instruct"
        if (p / "config.json").is_file():
            return p
    return None


# ------------------------------------------------------------------------------------- worker
def _lora_config(method: str, dropout: float = 0.05):
    if method != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj"],
                      task_type="CAUSAL_LM")


def _load(model_dir: str, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    m.config.use_cache = False
    if torch.cuda.is_available():
        m = m.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32).cuda()
    return m


def _measured(trainer, warmup: int):
    """A step timer on ``trainer``: per optimizer step, the samples/tokens of its micro-batches and its time."""
    rec = bp.BatchRecorder(trainer)
    timer = bp.step_timer(rec, warmup)
    trainer.add_callback(timer)
    return timer


def _result(trainer, timer, train_out, warmup: int) -> dict:
    """Whole run (``train_runtime``, the HF Trainer's clock, as for the peers) and warm steps (first ``warmup`` dropped)."""
    tot = {k: sum(st[k] for st in timer.steps) for k in ("samples", "real", "computed", "loss")}
    rt = train_out.metrics["train_runtime"]
    warm = timer.summary(warmup)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"samples_per_s": warm["samples_per_s"], "samples_per_cpu_s": warm["samples_per_cpu_s"], "loss_tokens_per_s": warm["loss_tokens_per_sample"] * warm["samples_per_s"],
            "tokens_per_s": warm["tokens_per_s"], "padding_fraction": 1 - tot["real"] / max(1, tot["computed"]),
            "warm_steps": warm["steps_measured"], "whole_samples_per_s": tot["samples"] / rt,
            "whole_loss_tokens_per_s": tot["loss"] / rt, "train_runtime": rt, "samples": tot["samples"],
            "loss_tokens": tot["loss"], "steps": trainer.state.global_step,
            "final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None}


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    setup, task, method = spec["setup"], spec["task"], spec["method"]
    from affinage.model.load import load_tokenizer_folder

    tok = load_tokenizer_folder(spec["model_dir"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    attn = "flash_attention_2" if torch.cuda.is_available() and bp._has("flash_attn") else "sdpa"
    if setup.startswith("trl"):
        return _worker_trl(spec, tok, attn, best=setup == "trl")
    return _worker_affinage(spec, tok, attn)


def _worker_trl(spec, tok, attn, best: bool) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if best and not torch.cuda.is_available():
        import trl.trainer.utils as tu

        tu._use_triton = lambda device: True  # compact fused head on CPU (see module doc)
    records = bp.load_records(Path(spec["data"]), spec["n"])
    if spec["task"] == "cpt":
        rows = [{"text": r["text"]} for r in records]
    else:
        rows = [{"prompt": [m for m in r["messages"] if m["role"] != "assistant"],
                 "completion": [m for m in r["messages"] if m["role"] == "assistant"]} for r in records]
    model = _load(spec["model_dir"], attn)
    micro = 1 if best else spec["batch"]
    liger = best and torch.cuda.is_available() and bp._has("liger_kernel")
    args = SFTConfig(**bp.common_args(tempfile.mkdtemp(prefix="bench-trl-"), micro, spec["batch"] // micro, spec["seed"],
                                      spec["epochs"]),
                     max_length=spec["max_length"], packing=best, packing_strategy="bfd", use_liger_kernel=liger)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=_lora_config(spec["method"]))
    bp._quiet(trainer)
    timer = _measured(trainer, spec["warmup"])
    out = trainer.train()
    from trl.trainer import utils as tu

    return {**_result(trainer, timer, out, spec["warmup"]), "attn": attn, "micro_batch": micro, "liger": liger,
            "compact_head": bool(tu._use_triton(torch.device("cpu"))) if best else False}


def _worker_affinage(spec, tok, attn) -> dict:
    from transformers import TrainingArguments

    from affinage.data.collator import PackedCollator, PackedDataset
    from affinage.data.prepare import prepare
    from affinage.recipe.schema import KernelsSpec, LossSpec, Recipe
    from affinage.train.attention import use_varlen_attention
    from affinage.train.kernels import apply_kernels
    from affinage.train.loss import AffinageTrainer

    setup, task = spec["setup"], spec["task"]
    packing = "none" if setup == "affinage-no-packing" else "bfd"
    recipe = Recipe.model_validate({
        "name": f"bench-{task}", "task": task, "seed": spec["seed"], "model": {"name_or_path": spec["model_dir"]},
        "data": {"sources": [{"path": spec["data"], "max_records": spec["n"]}], "max_length": spec["max_length"],
                 "packing": packing, "cache_dir": spec["cache_dir"], "num_proc": 1},
        "training": {"global_batch_size": spec["batch"], "duration": "1 epochs"},
    })
    cache = prepare(recipe, tok, progress=False)
    model = _load(spec["model_dir"], attn)
    lora = _lora_config(spec["method"], 0.0 if setup == "affinage-no-lora-dropout" else 0.05)
    if lora is not None:
        import torch
        from peft import get_peft_model

        torch.manual_seed(spec["seed"])
        model = get_peft_model(model, lora)
    impl = use_varlen_attention(model, spec["max_length"])
    kernels = apply_kernels(model, KernelsSpec(compile="on" if setup == "affinage-compile" else "off", liger="auto"))
    micro = spec["batch"] if task != "cpt" else spec["cpt_micro"]
    args = TrainingArguments(**bp.common_args(tempfile.mkdtemp(prefix="bench-aff-"), micro, spec["batch"] // micro,
                                              spec["seed"], spec["epochs"]), remove_unused_columns=False,
                             **kernels.training_arguments())
    loss = LossSpec(kind="chunked", chunk_tokens=spec["chunk_tokens"]) if setup == "affinage-chunked" else None
    trainer = AffinageTrainer(model=model, args=args, train_dataset=PackedDataset(cache.train),
                              data_collator=PackedCollator(tok.pad_token_id, task=task),
                              selective_loss=setup != "affinage-no-selective", loss_spec=loss)
    bp._quiet(trainer)
    timer = _measured(trainer, spec["warmup"])
    cpu0 = time.process_time()
    out = trainer.train()
    cpu = time.process_time() - cpu0
    from torch._dynamo.utils import counters

    return {**_result(trainer, timer, out, spec["warmup"]), "attn": impl, "micro_batch": micro, "rows": len(cache.train),
            "train_cpu_s": cpu, "kernels": kernels.line(), "compiled_graphs": counters["stats"].get("unique_graphs", 0)}


# ---------------------------------------------------------------------------------------- peers
def peer_llamafactory(spec: dict, work: Path) -> list[str] | str:
    """Command line for LLaMA-Factory's own CLI on the same job, or why it cannot run."""
    venv = PEERS / "llamafactory"
    cli = venv / "bin" / "llamafactory-cli"
    if not cli.exists():
        return f"not installed ({cli} missing): run bench/peers/install.sh"
    ddir = work / "lf-data"
    name = f"bench_{spec['task']}"
    _write_peer_data(spec, work)
    if spec["task"] == "cpt":
        info = {"file_name": f"{name}.jsonl", "columns": {"prompt": "text"}}
    else:
        info = {"file_name": f"{name}.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                         "system_tag": "system"}}
    known = json.loads((ddir / "dataset_info.json").read_text()) if (ddir / "dataset_info.json").exists() else {}
    (ddir / "dataset_info.json").write_text(json.dumps({**known, name: info}))
    out = work / f"lf-out-{spec['task']}-{spec['setup_rep']}"
    cfg = {
        "model_name_or_path": spec["model_dir"], "trust_remote_code": False,
        "stage": "pt" if spec["task"] == "cpt" else "sft", "do_train": True,
        "finetuning_type": "lora" if spec["method"] == "lora" else "full",
        **({"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target": "all"} if spec["method"] == "lora" else {}),
        "dataset": name, "dataset_dir": str(ddir), "template": "default", "cutoff_len": spec["max_length"],
        "packing": True, "neat_packing": True,  # packed rows, no attention across samples (its best such option)
        "overwrite_cache": True, "preprocessing_num_workers": 1, "output_dir": str(out),
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": spec["batch"], "num_train_epochs": spec["epochs"],
        "learning_rate": 5e-4, "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "bf16": False, "flash_attn": "sdpa", "disable_gradient_checkpointing": True,
        "seed": spec["seed"], "include_num_input_tokens_seen": True, "plot_loss": False,
    }
    # JSON is YAML; its CLI's .json branch passes a Path to json.load (0.9.5), so the file is named .yaml
    (work / f"lf-{spec['task']}.yaml").write_text(json.dumps(cfg))
    return [str(cli), "train", str(work / f"lf-{spec['task']}.yaml")]


def peer_result(out_dir: Path, spec: dict) -> dict:
    """Numbers from a peer's trainer_state.json / train_results.json (HF Trainer files)."""
    st = json.loads((out_dir / "trainer_state.json").read_text())
    res = json.loads((out_dir / "train_results.json").read_text()) if (out_dir / "train_results.json").exists() else {}
    rt = res.get("train_runtime") or next((h["train_runtime"] for h in st["log_history"] if "train_runtime" in h), None)
    losses = [h["loss"] for h in st["log_history"] if "loss" in h]
    samples = spec["n"] * spec["epochs"]
    tokens = st.get("num_input_tokens_seen") or res.get("num_input_tokens_seen")
    return {"whole_samples_per_s": samples / rt, "samples_per_s": None, "tokens_per_s": (tokens / rt) if tokens else None, "train_runtime": rt,
            "steps": st.get("global_step"), "final_loss": losses[-1] if losses else None,
            "whole_loss_tokens_per_s": (tokens / rt) if (tokens and spec["task"] == "cpt") else None,
            "padding_fraction": None}


def peer_axolotl(spec: dict, work: Path) -> list[str] | str:
    """Command line for axolotl's own CLI on the same job (sample packing; its Triton LoRA kernels off on CPU)."""
    venv = PEERS / "axolotl"
    if not (venv / "bin" / "axolotl").exists():
        log = PEERS / "axolotl.log"
        lines = [l for l in log.read_text(errors="replace").splitlines() if "ERROR" in l] if log.exists() else []
        return f"not installed: {lines[-1] if lines else 'run bench/peers/install.sh'}"
    data = work / "lf-data" / f"bench_{spec['task']}.jsonl"  # written by peer_llamafactory's helper below
    _write_peer_data(spec, work)
    ds = ({"path": str(data), "ds_type": "json", "type": "completion", "field": "text"} if spec["task"] == "cpt" else
          {"path": str(data), "ds_type": "json", "type": "chat_template", "field_messages": "messages",
           "roles_to_train": ["assistant"]})
    lora = spec["method"] == "lora"
    cfg = {
        "base_model": spec["model_dir"], "datasets": [ds], "chat_template": "tokenizer_default",
        "sequence_len": spec["max_length"], "sample_packing": True, "pad_to_sequence_len": False,
        **({"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_linear": True,
            "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False} if lora else {}),
        "micro_batch_size": 1, "gradient_accumulation_steps": spec["batch"], "num_epochs": spec["epochs"],
        "learning_rate": 5e-4, "lr_scheduler": "constant", "optimizer": "adamw_torch",
        "output_dir": str(work / f"axo-out-{spec['setup_rep']}"), "dataset_prepared_path": str(work / f"axo-prep-{spec['setup_rep']}"),
        "val_set_size": 0, "bf16": False, "fp16": False, "tf32": False, "logging_steps": 1, "save_strategy": "no",
        "flash_attention": False, "sdp_attention": True, "gradient_checkpointing": False, "seed": spec["seed"],
    }
    path = work / f"axo-{spec['task']}.yaml"
    path.write_text(json.dumps(cfg))
    return [str(venv / "bin" / "axolotl"), "train", str(path)]


def _write_peer_data(spec: dict, work: Path) -> None:
    ddir = work / "lf-data"
    ddir.mkdir(parents=True, exist_ok=True)
    records = bp.load_records(Path(spec["data"]), spec["n"])
    with open(ddir / f"bench_{spec['task']}.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"text": r["text"]} if spec["task"] == "cpt" else {"messages": r["messages"]}, ensure_ascii=False) + "\n")


def _stdout_result(out: str, spec: dict) -> dict:
    """train_runtime and losses from a Trainer's printed logs (axolotl saves no trainer_state with save_strategy no)."""
    import ast
    import re

    logs = []
    for m in re.finditer(r"\{'(?:loss|train_runtime)'[^{}]*\}", out):
        try:
            logs.append(ast.literal_eval(m.group(0)))
        except (ValueError, SyntaxError):
            pass
    rt = next((float(d["train_runtime"]) for d in reversed(logs) if "train_runtime" in d), None)
    if rt is None:
        raise KeyError("no train_runtime in its output")
    losses = [float(d["loss"]) for d in logs if "loss" in d]
    return {"whole_samples_per_s": spec["n"] * spec["epochs"] / rt, "samples_per_s": None, "train_runtime": rt,
            "final_loss": losses[-1] if losses else None, "steps": len(losses), "padding_fraction": None}


def run_peer(peer: str, spec: dict, work: Path) -> dict:
    cmd = peer_axolotl(spec, work) if peer == "axolotl" else peer_llamafactory(spec, work)
    if isinstance(cmd, str):
        return {"error": cmd}
    venv_bin = str(PEERS / peer / "bin")
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
           "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "PYTHONPATH": str(HERE / "peers" / "stubs") if peer == "llamafactory" else "",
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1",
           "VIRTUAL_ENV": str(PEERS / peer)}
    r = run_process(cmd, env=env, cwd=str(work), keep_output=True)
    out = r.pop("_out", "")
    if "error" in r:
        return r
    try:
        if peer == "axolotl":
            return {**r, **_stdout_result(out, spec)}
        out_dir = Path(json.loads((work / f"lf-{spec['task']}.yaml").read_text())["output_dir"])
        return {**r, **peer_result(out_dir, spec)}
    except (OSError, KeyError, TypeError) as e:
        tail = [l for l in out.splitlines() if "rror" in l][-1:] or out.splitlines()[-1:]
        return {**r, "error": f"no result ({e}); last error line: {tail[0][:300] if tail else ''}"}


# ------------------------------------------------------------------------------------------ main
TASKS = {  # name: (task, method, data key)
    "sft": ("sft", "full", "sft_data"), "lora-sft": ("sft", "lora", "sft_data"), "cpt": ("cpt", "full", "cpt_data"),
}


def setups_for(task: str, a, method: str = "full") -> list[str]:
    rows = ["trl", "affinage", "affinage-no-selective", "affinage-no-packing"]
    if task == "cpt":
        rows = ["trl", "affinage", "affinage-chunked", "affinage-no-packing"]
    if method == "lora":
        rows.append("affinage-no-lora-dropout")  # what peft's dropout on each adapter's input costs
    if a.trl_defaults:
        rows.insert(1, "trl-defaults")
    if a.compile:
        rows.insert(rows.index("affinage") + 1, "affinage-compile")
    peers = [p for p in a.peers.split(",") if p] if (method == "lora" or a.peers_on_all) else []
    return rows + peers


def summarise(vals: list[float]) -> dict:
    vals = [v for v in vals if v is not None]
    if not vals:
        return {}
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES) + ["smollm2"], default="toy")
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "lucie-7b-instruct"))
    p.add_argument("--sft-data", default=str(SHARED / "data" / "fr_instruct_piaf_qa.jsonl"))
    p.add_argument("--cpt-data", default=str(SHARED / "data" / "fr_legal_codes.jsonl"))
    p.add_argument("--tasks", default="sft,cpt", help="comma list of sft, lora-sft, cpt")
    p.add_argument("--sft-samples", type=int, default=48)
    p.add_argument("--cpt-samples", type=int, default=48)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="sequences (or packed rows) per optimizer step, every set-up")
    p.add_argument("--cpt-micro", type=int, default=2)
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps dropped from the warm figures")
    p.add_argument("--peers", default="llamafactory,axolotl", help="comma list (empty: none)")
    p.add_argument("--peers-on-all", action="store_true", help="peers on every task (default: LoRA SFT only)")
    p.add_argument("--trl-defaults", action="store_true", help="also run SFTTrainer with its defaults (slow on CPU)")
    p.add_argument("--compile", action="store_true", help="also run affinage-compile (torch.compile; minutes of compile on CPU)")
    p.add_argument("--only", default="", help="comma list of set-ups to run (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: all cores of this process)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--render", help="print the markdown tables of a --json file and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.render:
        print(render(json.loads(Path(a.render).read_text())))
        return 0
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker)), default=str), flush=True)
        return 0
    if a.quick:
        a.shape, a.sft_samples, a.cpt_samples, a.max_length, a.batch, a.cpt_micro = "quick", 6, 4, 256, 2, 1
        a.repeats, a.epochs, a.chunk_tokens = 1, 1, 64
    threads = a.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    if a.shape == "smollm2":
        model_dir = real_model_folder()
        if model_dir is None:
            print(f"SmolLM2-135M-Instruct not staged under {MODELS} (helper realmodel stages it): row skipped")
            return 0
    else:
        model_dir = make_model_folder(work / "model", Path(a.tokenizer), a.shape, a.seed, max(4096, a.max_length))
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    desc = (f"Llama {cfg['num_hidden_layers']}×{cfg['hidden_size']} (intermediate {cfg['intermediate_size']}), vocab "
            f"{cfg['vocab_size']}; L={a.max_length}, batch {a.batch}, {a.epochs:g} epochs, {a.repeats} repeats, "
            f"{threads} threads; load at start {load1():.2f}")
    print(desc, flush=True)
    results: dict = {"model": desc, "model_dir": str(model_dir), "args": vars(a), "tasks": {}}
    only = set(filter(None, a.only.split(",")))
    for tname in a.tasks.split(","):
        task, method, key = TASKS[tname]
        setups = [s for s in setups_for(task, a, method) if not only or s in only]
        runs: dict[str, list] = {s: [] for s in setups}
        n = a.sft_samples if task == "sft" else a.cpt_samples
        for rep in range(a.repeats):
            for s in setups:
                spec = {"setup": s, "task": task, "method": method, "model_dir": str(model_dir), "data": getattr(a, key),
                        "n": n, "max_length": a.max_length, "batch": a.batch, "cpt_micro": a.cpt_micro, "epochs": a.epochs,
                        "seed": a.seed, "warmup": a.warmup, "threads": threads, "cache_dir": str(work / "cache"), "chunk_tokens": a.chunk_tokens,
                        "setup_rep": f"{s}-{rep}"}
                if s in ("llamafactory", "axolotl"):
                    r = run_peer(s, spec, work)
                else:
                    r = run_process([sys.executable, __file__, "--worker", json.dumps(spec)],
                                    env={**os.environ, "OMP_NUM_THREADS": str(threads)})
                runs[s].append(r)
                msg = r.get("error") or (f"{r.get('samples_per_s') or float('nan'):.2f} samples/s warm, "
                                         f"{r['whole_samples_per_s']:.2f} whole run, {r['train_runtime']:.1f} s, "
                                         f"peak {r['peak_rss_gb']:.2f} GB, load {statistics.mean(r['load_during']):.1f}")
                print(f"  [{tname}] rep {rep} {s}: {msg}", flush=True)
                if "error" in r and s in ("llamafactory", "axolotl"):
                    break  # a peer that cannot run fails the same way every repeat
        results["tasks"][tname] = report(tname, runs)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def report(tname: str, runs: dict) -> dict:
    keys = ("samples_per_s", "samples_per_cpu_s", "whole_samples_per_s", "loss_tokens_per_s", "padding_fraction", "peak_rss_gb",
            "final_loss", "process_cpu_s")
    print(f"\n[{tname}] min/median/max over repeats. warm: steps after the first; whole: trainer.train()'s runtime")
    print(f"  {'set-up':<22}{'samples/s warm':>20}{'samples/CPU-s warm':>20}{'samples/s whole':>20}{'loss tok/s warm':>18}{'padding':>9}"
          f"{'peak RSS GB':>17}{'final loss':>12}{'load 1-min':>16}")
    fmt = lambda d, f="{:.2f}": "/".join(f.format(d[x]) for x in ("min", "median", "max")) if d else "n/a"  # noqa: E731
    table = {}
    for s, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            print(f"  {s:<22}did not run: {rs[0].get('error') if rs else 'no run'}")
            table[s] = {"error": rs[0].get("error") if rs else None}
            continue
        st = {k: summarise([r.get(k) for r in ok]) for k in keys}
        st["load"] = summarise([x for r in ok for x in r["load_during"]])
        pad = "{:.1%}".format(st["padding_fraction"]["median"]) if st["padding_fraction"] else "n/a"
        fl = "{:.3f}".format(st["final_loss"]["median"]) if st["final_loss"] else "n/a"
        print(f"  {s:<22}{fmt(st['samples_per_s']):>20}{fmt(st['samples_per_cpu_s'], '{:.3f}'):>20}{fmt(st['whole_samples_per_s']):>20}"
              f"{fmt(st['loss_tokens_per_s'], '{:.0f}'):>18}{pad:>9}{fmt(st['peak_rss_gb']):>17}{fl:>12}"
              f"{fmt(st['load'], '{:.1f}'):>16}")
        table[s] = {"stats": st, "runs": rs}
    base = [r for r in runs.get("affinage", []) if "error" not in r]
    for s, rs in runs.items():
        if s == "affinage" or not base:
            continue
        ok = [r for r in rs if "error" not in r]
        wall = "samples_per_s" if ok and all(r.get("samples_per_s") for r in ok) else "whole_samples_per_s"  # peers: whole run only
        for key, name in ((wall, "affinage_ratio"), ("samples_per_cpu_s", "affinage_ratio_cpu")):
            ratios = [b[key] / r[key] for b, r in zip(base, rs) if "error" not in r and r.get(key) and b.get(key)]
            if not ratios:
                continue
            st = summarise(ratios)
            table[s][name] = {**st, "on": key}
            print(f"  affinage / {s:<22} ×{st['median']:.2f} (min {st['min']:.2f}, max {st['max']:.2f}, "
                  f"{st['n']} repeats; {key.replace('_', ' ')})")
    return table


def render(results: dict) -> str:
    """Markdown tables (min / median / max) of a --json file: what the README and the note quote."""
    f = lambda d, fmt="{:.2f}": "–" if not d else f"{fmt.format(d['median'])} ({fmt.format(d['min'])}–{fmt.format(d['max'])})"  # noqa: E731
    lines = [f"Model: {results['model']}", ""]
    for tname, table in results["tasks"].items():
        lines += [f"**{tname}**", "", "| set-up | samples/s warm | samples/CPU-s warm | samples/s whole run | loss tok/s warm | "
                  "padding | peak RSS GB | final loss | load 1-min | affinage ÷ row | affinage ÷ row per CPU-s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s, row in table.items():
            if "stats" not in row:
                lines.append(f"| {s} | did not run: {row.get('error')} |||||||| ")
                continue
            st = row["stats"]
            pad = "–" if not st["padding_fraction"] else f"{st['padding_fraction']['median']:.1%}"
            r = row.get("affinage_ratio")
            rc = row.get("affinage_ratio_cpu")
            lines.append(f"| {s} | {f(st['samples_per_s'])} | {f(st.get('samples_per_cpu_s'), '{:.3f}')} | {f(st.get('whole_samples_per_s'))} "
                         f"| {f(st['loss_tokens_per_s'], '{:.0f}')} | {pad} | {f(st['peak_rss_gb'])} | {f(st['final_loss'], '{:.3f}')} "
                         f"| {f(st['load'], '{:.1f}')} | {'–' if not r else f(r) + (' (whole run)' if r['on'].startswith('whole') else '')} "
                         f"| {'–' if not rc else f(rc)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
