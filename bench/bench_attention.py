#!/usr/bin/env python
"""Attention over padding-free rows: affinage's grouped per-segment SDPA against its baselines.

Forward + backward of one attention layer on one packed row, in CPU seconds (``time.process_time``),
repeats interleaved, min/median/max, ``/proc/loadavg`` before and after. Rows:

- ``grouped``: ``train.attention._varlen_sdpa`` as shipped (short segments in padded groups);
- ``per-segment``: the same function with grouping off (``GROUP_MAX_TOKENS = 0``): one call per
  segment, affinage's path before grouping;
- ``dense-mask``: one SDPA call with a block-diagonal causal mask over the row, which is what
  transformers' SDPA path computes for a packed row with ``position_ids`` (cost (Σ n)²).

Row contents are segment-length mixes typical of SFT rows (short chat turns, PIAF-like answers with
context, a CPT-like row of long documents). Heads/dim: the 12×768 bench shape (12 query, 4 KV heads).

    python bench/bench_attention.py [--repeats 9] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from affinage.train import attention


class _Module(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def mixes(seed: int = 0) -> dict[str, list[int]]:
    r = random.Random(seed)
    return {
        "32 × 64 tokens": [64] * 32,
        "short chat, 20..128": [r.randint(20, 128) for _ in range(30)],
        "PIAF-like, 150..450": [r.randint(150, 450) for _ in range(7)],
        "mixed, 20..400": [r.randint(20, 400) for _ in range(14)],
        "CPT, 1024 + 512 + 512": [1024, 512, 512],
    }


def _grouped(module, q, k, v, cu):
    return attention._varlen_sdpa(module, q, k, v, None, cu_seq_lens_q=cu)[0]


def _per_segment(module, q, k, v, cu):
    saved = attention.GROUP_MAX_TOKENS
    attention.GROUP_MAX_TOKENS = 0
    try:
        return attention._varlen_sdpa(module, q, k, v, None, cu_seq_lens_q=cu)[0]
    finally:
        attention.GROUP_MAX_TOKENS = saved


def _dense(module, q, k, v, cu):
    total = q.shape[2]
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    pos = torch.arange(total)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    g = module.num_key_value_groups
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
    return o.transpose(1, 2)


ROWS = {"grouped": _grouped, "per-segment": _per_segment, "dense-mask": _dense}


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def run(repeats: int, heads: int = 12, kv_heads: int = 4, dim: int = 64) -> dict:
    module = _Module(heads // kv_heads)
    out = {"heads": heads, "kv_heads": kv_heads, "dim": dim, "threads": torch.get_num_threads(), "mixes": {}}
    for name, lengths in mixes().items():
        total = sum(lengths)
        cu = torch.tensor([0] + [sum(lengths[: i + 1]) for i in range(len(lengths))])
        torch.manual_seed(0)
        q = torch.randn(1, heads, total, dim, requires_grad=True)
        k = torch.randn(1, kv_heads, total, dim, requires_grad=True)
        v = torch.randn(1, kv_heads, total, dim, requires_grad=True)
        ref = _per_segment(module, q, k, v, cu)
        err = {row: float((f(module, q, k, v, cu) - ref).detach().abs().max()) for row, f in ROWS.items()}
        times = {row: [] for row in ROWS}
        load0 = loadavg()
        for _ in range(repeats):
            for row, f in ROWS.items():
                t = time.process_time()
                f(module, q, k, v, cu).sum().backward()
                times[row].append(time.process_time() - t)
        calls = len(attention.length_groups(lengths, attention.GROUP_MAX_TOKENS, attention.GROUP_SLACK))
        out["mixes"][name] = {
            "segments": len(lengths), "tokens": total, "grouped_calls": calls, "max_abs_diff": err,
            "ms": {row: [1000 * min(t), 1000 * statistics.median(t), 1000 * max(t)] for row, t in times.items()},
            "per_segment_over_grouped": statistics.median(a / b for a, b in zip(times["per-segment"], times["grouped"])),
            "load": [load0, loadavg()],
        }
    return out


def render(res: dict) -> str:
    lines = [f"heads {res['heads']} (KV {res['kv_heads']}) × dim {res['dim']}, {res['threads']} thread(s); "
             "forward+backward ms, min / median / max",
             "", "| row mix | segments (tokens) | calls grouped | grouped | per-segment | dense mask | per-segment ÷ grouped | load |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in res["mixes"].items():
        cell = lambda row: "{:.1f} / {:.1f} / {:.1f}".format(*m["ms"][row])  # noqa: E731
        lines.append(f"| {name} | {m['segments']} ({m['tokens']}) | {m['grouped_calls']} | {cell('grouped')} | "
                     f"{cell('per-segment')} | {cell('dense-mask')} | {m['per_segment_over_grouped']:.2f}× | "
                     f"{m['load'][0]:.1f}–{m['load'][1]:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = run(a.repeats)
    print(render(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
