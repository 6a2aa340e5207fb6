#!/usr/bin/env python
"""Eval throughput: ``affinage eval`` perplexity vs the same model's training forward vs lm-eval.

One process, one random-init Llama (same weights for every set-up), the Lucie-7B tokenizer (65k
vocabulary) and the real 19th-century French novels of ``../shared`` (passages; the book is the
``source`` field without its ``#n`` passage suffix, printed as the number of groups). Set-ups,
repeats interleaved (e p t l e p t l ...), each timed on the whole set:

* ``eval``: ``affinage.eval.perplexity.score_texts``, the packed path (windows laid out
  best-fit-decreasing into rows of ``max_length``, varlen attention, one forward per row);
* ``eval-disjoint``: the packed path with windows that overlap by one token (stride ``max_length - 1``),
  so that nearly every position read is scored, as in training: the like-for-like forward comparison
  (the default stride, half a window, computes the output head on the new half only);
* ``eval-padded``: the same windows, unpacked (right-padded batches): the path before packing;
* ``train-fwd``: the trainer's forward and loss on the same texts laid out as CPT training lays them
  out (``layout_concat`` rows, ``PackedCollator``, varlen attention, ``selective_lm_loss``), under
  ``torch.no_grad()``: forward only, no backward, no optimizer — the part eval can be compared with;
* ``lm-eval``: lm-evaluation-harness ``HFLM.loglikelihood_rolling`` on the same texts and model
  (skipped, with the reason, when ``lm_eval`` cannot be imported).

Two throughputs per set-up: ``read`` tokens/s (tokens the model computes on: the forward's speed)
and ``scored`` tokens/s (text tokens that get a log-likelihood: what a user waits for). Eval's
sliding windows re-read context, so read ≥ scored there; training and lm-eval's disjoint rolling
windows read each token once. The target (issue 16) is eval ``read`` ≥ 80 % of train-fwd ``read``.
Load average (/proc/loadavg) is recorded before every timed run: the machine may be shared.

    python bench/bench_eval.py                  # full run (minutes on a 2-core CPU)
    python bench/bench_eval.py --quick          # seconds: the CI smoke check
    python bench/bench_eval.py --json out.json  # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AFFINAGE_SHARED") or REPO.parent / "shared")
NOVELS = SHARED / "data" / "fr_literature_roman19.jsonl"
TOKENIZER = SHARED / "tokenizers" / "lucie-7b-instruct"


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def read_passages(n: int, max_chars: int | None) -> tuple[list[str], list[str]]:
    """The first passage of ``n`` books (spread over the set), and each one's book."""
    by_book: dict[str, list[str]] = {}
    with open(NOVELS, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            by_book.setdefault(r["source"].split("#")[0], []).append(r["text"])
    texts, books, k = [], [], 0
    while len(texts) < n and any(len(v) > k for v in by_book.values()):
        for book, passages in by_book.items():
            if len(passages) > k and len(texts) < n:
                texts.append(passages[k][:max_chars] if max_chars else passages[k])
                books.append(book)
        k += 1
    return texts, books


def build_model(vocab: int, layers: int, hidden: int, max_pos: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=max_pos, tie_word_embeddings=False, use_cache=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------ set-ups
def run_eval(model, tok, texts, max_length: int, packed: bool, stride: int | None = None) -> dict:
    from affinage.eval import perplexity

    meter: dict = {}
    t0 = time.perf_counter()
    scores = perplexity.score_texts(model, tok, texts, max_length=max_length, packed=packed, batch_size=4, meter=meter,
                                    stride=stride)
    s = time.perf_counter() - t0
    return {"seconds": s, "read": meter["tokens"], "scored": meter["scored"], "forwards": meter["forwards"],
            "nll": sum(x.nll for x in scores)}


def training_rows(tok, texts, max_length: int) -> list[dict]:
    """The texts as CPT training lays them out: [BOS] text [EOS], concatenated, cut into rows, document-masked."""
    import numpy as np

    from affinage.data.packing import layout_concat

    docs = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    layout = layout_concat([len(d) for d in docs], max_length, document_mask=True)
    rows = []
    for r in range(layout.num_rows):
        a, b = layout.row_offsets[r], layout.row_offsets[r + 1]
        pieces = [docs[i][s: s + n] for i, s, n in zip(layout.item[a:b], layout.start[a:b], layout.length[a:b])]
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])
        mask = np.concatenate([np.arange(len(p)) > 0 for p in pieces])
        rows.append({"input_ids": ids, "loss_mask": mask, "seq_lens": [len(p) for p in pieces]})
    return rows


def run_train_forward(model, rows) -> dict:
    import torch

    from affinage.data.collator import PackedCollator
    from affinage.train.attention import use_varlen_attention
    from affinage.train.loss import selective_lm_loss

    collate = PackedCollator(pad_token_id=0, task="cpt")
    before = model.config._attn_implementation
    use_varlen_attention(model)
    read = scored = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for row in rows:  # one row per micro-batch, as eval
            batch = collate([row])
            read += batch["input_ids"].numel()
            scored += int((batch["labels"][0, 1:] != -100).sum())
            selective_lm_loss(model, batch)
    s = time.perf_counter() - t0
    model.set_attn_implementation(before)
    return {"seconds": s, "read": read, "scored": scored, "forwards": len(rows)}


def lm_eval_missing() -> str | None:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any reason it cannot run is the reason printed
        return f"lm_eval not importable ({type(e).__name__}: {e}); pip install lm-eval (or put it on PYTHONPATH)"
    return None


def run_lm_eval(model, tok, texts, max_length: int) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=max_length, device="cpu")
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    t0 = time.perf_counter()
    out = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    s = time.perf_counter() - t0
    # rolling windows: every text token scored once (plus the prefix token), each read once
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {"seconds": s, "read": n, "scored": n, "forwards": None, "nll": -float(sum(out))}


# ---------------------------------------------------------------------------------------- main
def summarise(runs: list[dict]) -> dict:
    out = {"repeats": len(runs)}
    for k in ("read", "scored"):
        rates = [r[k] / r["seconds"] for r in runs]
        out[f"{k}_tokens_per_s"] = {"min": min(rates), "median": statistics.median(rates), "max": max(rates)}
    out["seconds"] = {"min": min(r["seconds"] for r in runs), "median": statistics.median(r["seconds"] for r in runs)}
    out["loadavg_before"] = [r["loadavg"] for r in runs]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: the CI smoke check")
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--max-chars", type=int, default=2400)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--no-lm-eval", action="store_true")
    ap.add_argument("--json", help="write the numbers here")
    a = ap.parse_args(argv)
    if a.quick:
        a.docs, a.max_chars, a.layers, a.hidden, a.max_length, a.repeats = 4, 1200, 1, 64, 128, 1
    if not NOVELS.is_file() or not TOKENIZER.is_dir():
        print(f"needs {NOVELS} and {TOKENIZER} (../shared)", file=sys.stderr)
        return 2
    import torch

    from affinage.model.load import load_tokenizer_folder

    torch.set_num_threads(a.threads)
    tok = load_tokenizer_folder(TOKENIZER)
    texts, books = read_passages(a.docs, a.max_chars)
    model = build_model(len(tok), a.layers, a.hidden, max(a.max_length, 128), seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    rows = training_rows(tok, texts, a.max_length)
    missing = None if not a.no_lm_eval else "--no-lm-eval"
    missing = missing or lm_eval_missing()
    setups = {"eval": lambda: run_eval(model, tok, texts, a.max_length, packed=True),
              "eval-disjoint": lambda: run_eval(model, tok, texts, a.max_length, packed=True, stride=a.max_length - 1),
              "eval-padded": lambda: run_eval(model, tok, texts, a.max_length, packed=False),
              "train-fwd": lambda: run_train_forward(model, rows)}
    if missing is None:
        setups["lm-eval"] = lambda: run_lm_eval(model, tok, texts, a.max_length)
    run_eval(model, tok, texts[:2], a.max_length, packed=True)  # warm-up (allocator, kernels)
    runs: dict[str, list] = {k: [] for k in setups}
    for rep in range(a.repeats):
        for name, fn in setups.items():
            la = loadavg()
            r = fn()
            r["loadavg"] = la
            runs[name].append(r)
            print(f"[{rep + 1}/{a.repeats}] {name:<12} {r['seconds']:7.2f} s  read {r['read'] / r['seconds']:9,.0f} tok/s  "
                  f"scored {r['scored'] / r['seconds']:9,.0f} tok/s  (load {la})", flush=True)
    res = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": a.threads,
                    "torch": torch.__version__},
        "model": {"layers": a.layers, "hidden": a.hidden, "vocab": len(tok), "parameters": n_params},
        "set": {"path": str(NOVELS), "documents": len(texts), "books": len(set(books)), "max_chars": a.max_chars,
                "max_length": a.max_length},
        "setups": {k: summarise(v) for k, v in runs.items()},
        "lm_eval": {"skipped": missing} if missing else {"version": _version("lm_eval")},
        "nll": {k: v[0].get("nll") for k, v in runs.items() if v and v[0].get("nll") is not None},
    }
    e = res["setups"]["eval"]["read_tokens_per_s"]["median"]
    t = res["setups"]["train-fwd"]["read_tokens_per_s"]["median"]
    p = res["setups"]["eval-padded"]["read_tokens_per_s"]["median"]
    d = res["setups"]["eval-disjoint"]["read_tokens_per_s"]["median"]
    res["ratios"] = {"eval_over_train_forward": e / t, "eval_disjoint_over_train_forward": d / t,
                     "eval_over_eval_padded": e / p}
    if "lm-eval" in res["setups"]:
        res["ratios"]["eval_scored_over_lm_eval_scored"] = (res["setups"]["eval"]["scored_tokens_per_s"]["median"]
                                                           / res["setups"]["lm-eval"]["scored_tokens_per_s"]["median"])
    print(f"\n{len(texts)} passages of {len(set(books))} books, {n_params / 1e6:.1f}M-parameter Llama "
          f"({a.layers}×{a.hidden}, vocab {len(tok)}), max_length {a.max_length}, {a.repeats} repeats, {a.threads} thread(s)")
    for k, v in res["setups"].items():
        r, s = v["read_tokens_per_s"], v["scored_tokens_per_s"]
        print(f"{k:<12} read {r['median']:9,.0f} tok/s [{r['min']:,.0f}–{r['max']:,.0f}]   "
              f"scored {s['median']:9,.0f} tok/s [{s['min']:,.0f}–{s['max']:,.0f}]")
    if missing:
        print(f"{'lm-eval':<12} skipped: {missing}")
    print("ratios       " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2), encoding="utf-8")
    return 0


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
