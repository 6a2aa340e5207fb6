"""Tokenization speed of ``affinage prepare`` against the raw ``tokenizers`` ``encode_batch``, same texts.

For each task, in one process and with ``TOKENIZERS_PARALLELISM=false`` (one core, like each
worker of ``prepare``), repeats interleave:

* raw: ``backend_tokenizer.encode_batch`` on the texts the model will see, ``CHUNK_RECORDS`` at a
  time (cpt: the documents; sft: the conversations as the chat template renders them, rendered
  once beforehand and not timed);
* affinage: ``data.tokenize.tokenize_chunk`` on the canonical records, the function every worker of
  ``prepare`` runs: for sft it renders the template, finds the assistant spans, tokenizes with
  offsets and builds the loss mask; for cpt it adds BOS/EOS and cuts documents;
* prepare: the whole ``affinage prepare`` (``num_proc: 1``, a fresh cache each time): reading,
  JSON, filters, tokenization, packing and writing the cache, all in this process.

Both are timed in CPU seconds of this process (``time.process_time``) and reported as raw tokens
per CPU-second, so the ratio is the share of the tokenizer's own speed that ``prepare`` keeps.
Prints min/median/max over the repeats and the load average before and after.

    python bench/bench_prepare.py [--repeats 5] [--sft-records N] [--cpt-records N] [--json out.json] [--src DIR]

(0 records: the whole file, the default.) ``--src``: the ``src`` folder of another checkout to bench
instead of this one's, for a before/after in the same conditions, e.g. ``git archive <rev> src | tar -x
-C /tmp/before`` then runs alternating ``--src /tmp/before/src`` and this tree (the ratios, each against
its own raw ``encode_batch``, are what compare).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AFFINAGE_SHARED") or REPO.parent / "shared")
SRC = Path(sys.argv[sys.argv.index("--src") + 1]).resolve() if "--src" in sys.argv[:-1] else REPO / "src"
sys.path.insert(0, str(SRC))


def load_records(path: Path, kind: str, n: int) -> list[dict]:
    from affinage.data.formats import to_canonical

    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if len(out) >= n:
                break
            out.append(to_canonical(json.loads(line), kind, where=f"{path.name}:{i + 1}"))
    return out


def chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def time_raw(backend, texts: list[str], size: int) -> tuple[float, int]:
    t = time.process_time()
    n = 0
    for c in chunks(texts, size):
        n += sum(len(e.ids) for e in backend.encode_batch(c, add_special_tokens=False))
    return time.process_time() - t, n


def time_affinage(tok, backend, task: str, records: list[dict], max_length: int, packing: str, size: int) -> tuple[float, int]:
    from affinage.data.tokenize import tokenize_chunk

    work = [(i, f"r{i}", r) for i, r in enumerate(records)]
    t = time.process_time()
    n = 0
    for c in chunks(work, size):
        for _, err, res in tokenize_chunk(tok, backend, task, max_length, packing, c):
            if err is not None:
                raise SystemExit(f"record failed: {err[0]}")
            n += res.full_length
    return time.process_time() - t, n


def time_prepare(tok, tok_dir: Path, task: str, path: Path, n: int, max_length: int, cache: Path) -> tuple[float, int]:
    import shutil

    from affinage.data.prepare import prepare
    from affinage.recipe.schema import Recipe

    recipe = Recipe.model_validate({
        "name": f"bench-{task}", "task": task, "seed": 0, "model": {"name_or_path": str(tok_dir)},
        "data": {"sources": [{"path": str(path), **({"max_records": n} if n else {})}], "max_length": max_length,
                 "cache_dir": str(cache), "num_proc": 1},
        "training": {"global_batch_size": 1, "duration": "1 steps"},
    })
    shutil.rmtree(cache, ignore_errors=True)
    t = time.process_time()
    built = prepare(recipe, tok, progress=False)
    return time.process_time() - t, built.stats["tokenization"]["tokens"]


def spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def run_task(task: str, tok_name: str, data_file: str, n: int, a) -> dict:
    from transformers import AutoTokenizer

    from affinage.data.templates import chat_for_training
    from affinage.data.tokenize import CHUNK_RECORDS, fast_backend

    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / tok_name))
    backend = fast_backend(tok)
    kind = "chat" if task == "sft" else "text"
    records = load_records(SHARED / "data" / data_file, kind, n or 1 << 40)
    texts = [chat_for_training(tok, r["messages"], tools=r.get("tools")).text for r in records] if task == "sft" else [r["text"] for r in records]
    packing = "bfd"
    tps: dict[str, list[float]] = {"raw": [], "aff": [], "prep": []}
    ratios: dict[str, list[float]] = {"aff": [], "prep": []}
    tokens = None
    kinds = ["raw", "aff"] + (["prep"] if a.prepare else [])
    for rep in range(a.repeats + 1):  # the first round warms caches and is not counted
        order = kinds[rep % len(kinds):] + kinds[: rep % len(kinds)]  # rotate who goes first
        got = {}
        for which in order:
            if which == "raw":
                got[which] = time_raw(backend, texts, CHUNK_RECORDS)
            elif which == "aff":
                got[which] = time_affinage(tok, backend, task, records, a.max_length, packing, CHUNK_RECORDS)
            else:
                got[which] = time_prepare(tok, SHARED / "tokenizers" / tok_name, task, SHARED / "data" / data_file, n, a.max_length, a.cache / task)
        tokens = got["raw"][1]
        if rep == 0:
            continue
        for k in kinds:
            tps[k].append(tokens / got[k][0])
        for k in kinds[1:]:
            ratios[k].append(tps[k][-1] / tps["raw"][-1])
    out = {"task": task, "tokenizer": tok_name, "data": data_file, "records": len(records), "tokens": tokens,
           "max_length": a.max_length, "repeats": a.repeats,
           "raw_tokens_per_cpu_s": spread(tps["raw"]), "affinage_tokens_per_cpu_s": spread(tps["aff"]),
           "affinage_over_raw": spread(ratios["aff"]), "per_repeat": {"tokens_per_cpu_s": tps, "over_raw": ratios}}
    if a.prepare:
        out["prepare_tokens_per_cpu_s"] = spread(tps["prep"])
        out["prepare_over_raw"] = spread(ratios["prep"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sft-records", type=int, default=0)
    p.add_argument("--cpt-records", type=int, default=0)
    p.add_argument("--no-prepare", dest="prepare", action="store_false", help="skip the whole-prepare column")
    p.add_argument("--cache", type=Path, default=Path("/tmp/affinage-bench-prepare"))
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--sft-tokenizer", default="qwen2.5-instruct")
    p.add_argument("--cpt-tokenizer", default="lucie-7b-instruct")
    p.add_argument("--json", type=Path)
    p.add_argument("--src", type=Path, default=SRC, help="the src folder whose affinage is benched (read at import)")
    a = p.parse_args(argv)
    if not (SHARED / "data").is_dir():
        print(f"needs the shared corpora and tokenizers at {SHARED} (set AFFINAGE_SHARED)", file=sys.stderr)
        return 2
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    results = [
        run_task("cpt", a.cpt_tokenizer, "fr_legal_codes.jsonl", a.cpt_records, a),
        run_task("sft", a.sft_tokenizer, "fr_instruct_piaf_qa.jsonl", a.sft_records, a),
    ]
    load_after = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    import affinage

    out = {"results": results, "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
           "affinage": str(Path(affinage.__file__).parent)}
    print(f"affinage from {out['affinage']}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    print("tokens per CPU-second, min/median/max over the repeats; ratios per repeat against raw encode_batch")
    print(f"{'task':<5}{'tokenizer':<19}{'records':>8}{'tokens':>10}  {'raw encode_batch':<26}{'tokenize_chunk':<26}"
          f"{'ratio':<16}{'whole prepare':<26}{'ratio':<16}")

    def f(d, fmt):
        return "/".join(fmt.format(d[k]) for k in ("min", "median", "max")) if d else "-"

    for r in results:
        print(f"{r['task']:<5}{r['tokenizer']:<19}{r['records']:>8}{r['tokens']:>10}  {f(r['raw_tokens_per_cpu_s'], '{:,.0f}'):<26}"
              f"{f(r['affinage_tokens_per_cpu_s'], '{:,.0f}'):<26}{f(r['affinage_over_raw'], '{:.2f}'):<16}"
              f"{f(r.get('prepare_tokens_per_cpu_s'), '{:,.0f}'):<26}{f(r.get('prepare_over_raw'), '{:.2f}'):<16}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
