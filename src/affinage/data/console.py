"""What ``affinage prepare`` prints: a few lines a person reads to check the data before training."""

from __future__ import annotations

from affinage.data.cache import PreparedCache


def format_prepare_summary(cache: PreparedCache) -> str:
    s = cache.stats
    if s.get("kind") == "preference":
        from affinage.data.preference import format_preference_summary

        return format_preference_summary(cache)
    lines = ["", "── affinage prepare " + "─" * 40,
             f"cache           {cache.path}  ({'hit' if cache.hit else 'built'} in {cache.seconds:.2f} s)"]
    for name, src in s["sources"].items():
        kept = src["documents_kept"]
        drops = ", ".join(f"{k} {v['dropped']}" for k, v in src["filters"].items()) or "no filter"
        lines.append(f"{name:<15} {src['records_read']} read, {kept} kept ({drops}); "
                     f"{src['train']['tokens']:,} train tokens, {src['train']['loss_tokens']:,} with loss")
    p = s["packing"]
    tr = p["train"]
    lines.append(f"packing         {p['mode']}: {tr['rows']} rows of ≤{s['max_length']} tokens, "
                 f"{tr['segments_per_row']} samples/row, row fill {tr['row_fill']}, padding computed on: {s['padding_fraction']}")
    if "decontamination" in s:
        d = s["decontamination"]
        lines.append(f"decontamination {d['documents']} documents share a {d['ngram']}-gram with {len(d['eval_files'])} eval file(s) ({d['action']})")
    t = s["tokenization"]
    if t["tokens_per_second"]:
        lines.append(f"tokenization    {t['tokens']:,} tokens, {t['tokens_per_second']:,.0f} tok/s on {t['num_proc']} processes")
    return "\n".join(lines)
