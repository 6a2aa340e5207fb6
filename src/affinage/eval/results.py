"""The results of an evaluation on disk: ``RUN_DIR/eval/results.json`` and ``details.jsonl``.

Eval writes them; provenance (report, card) and the console read them, so each can be rebuilt
from the run directory alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

RESULTS_FILE = "results.json"
DETAILS_FILE = "details.jsonl"


def change_text(d: dict, digits: int = 3, key: str = "delta") -> str:
    """``+0.100 [-0.079, +0.265]``: a change (or value) and its interval, as console and reports print it."""
    return f"{d[key]:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]"


def verdict_text(d: dict) -> str:
    """``real`` when a change's 95 % interval excludes zero, else ``not established``: one wording everywhere."""
    return "real" if d["excludes_zero"] else "not established"


def counted(e: dict, count_key: str, noun: str = "") -> str:
    """``557`` or ``557 passages in 20 groups`` (groups are what the bootstrap resamples): console and report alike."""
    n = f"{e[count_key]} {noun}".rstrip()
    return f"{n} in {e['groups']} groups" if e.get("groups") is not None else n


def eval_dir(root: Path) -> Path:
    from affinage.run import RunDir

    return RunDir(root).eval


def write_results(root: Path, results: dict, raw: dict, data, spec) -> Path:
    """``eval/results.json`` (the figures) and ``eval/details.jsonl`` (one line per document, item, sample)."""
    from affinage.run import write_json, write_text

    out = eval_dir(root)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for role, r in raw.items():
        for name, scores in r["perplexity"].items():
            for i, sc in enumerate(scores):
                lines.append({"model": role, "kind": "perplexity", "set": name, "index": i, **sc.as_dict()})
        for name, per_item in r["mcq"].items():
            for i, row in enumerate(per_item):
                lines.append({"model": role, "kind": "mcq", "set": name, "index": i, **row})
        for i, sc in enumerate(r.get("preference") or []):
            lines.append({"model": role, "kind": "preference", "index": i, **sc})
        for name, per_item in r.get("extractive", {}).items():
            for i, row in enumerate(per_item):
                lines.append({"model": role, "kind": "extractive", "set": name, "index": i, **row})
        for i, text in enumerate(r["generation"] or []):
            lines.append({"model": role, "kind": "generation", "index": i, "prompt": data.prompts[i], "output": text})
    write_text(out / DETAILS_FILE, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return write_json(out / RESULTS_FILE, {k: v for k, v in results.items() if not k.startswith("_")})


def read_results(root: Path) -> Optional[dict]:
    p = eval_dir(root) / RESULTS_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
