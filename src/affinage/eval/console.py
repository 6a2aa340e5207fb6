"""The console summary of an evaluation (the report has the same numbers, with plots)."""

from __future__ import annotations

from pathlib import Path

from affinage.eval.results import RESULTS_FILE, change_text, counted, eval_dir, verdict_text


def _console_verdict(d: dict) -> str:
    if d.get("too_few"):
        return f"too few to tell: {d['n_groups']} groups" if "n_groups" in d else f"too few to tell: {d['n']} units"
    return verdict_text(d)


def _change(d: dict) -> str:
    """``+0.100 [-0.079, +0.265] (not established)``: a paired change, its interval and the verdict."""
    return f"{change_text(d)} ({_console_verdict(d)})"


def format_results(results: dict) -> str:
    """The console summary (the report has the same numbers with plots)."""
    lines = ["", "── affinage eval " + "─" * 43]
    for e in results.get("perplexity", []):
        b, t = e.get("base"), e.get("tuned")
        line = f"{e['name']:<20} {e['role']:<10} bits/byte "
        if b and t:
            d = e["delta"]["bits_per_byte"]
            rel = d["relative"]
            verdict = _console_verdict(d)
            line += (f"{b['bits_per_byte']:.4f} → {t['bits_per_byte']:.4f}  {rel['delta'] * 100:+.1f}% "
                     f"[{rel['ci_low'] * 100:+.1f}%, {rel['ci_high'] * 100:+.1f}%] ({verdict})")
        else:
            line += f"{t['bits_per_byte']:.4f}"
        lines.append(line)
    for e in results.get("mcq", []):
        b, t = e.get("base"), e.get("tuned")
        line = f"{e['name']:<20} {e['role']:<10} acc "
        if b and t:
            d = e["delta"]["acc"]
            line += (f"{b['acc']:.3f} → {t['acc']:.3f}  {_change(d)}   acc_norm {b['acc_norm']:.3f} → {t['acc_norm']:.3f}  "
                     f"({counted(e, 'items', 'items')}, chance {e['chance']:.3f})")
        else:
            line += f"{t['acc']:.3f}   acc_norm {t['acc_norm']:.3f}  ({counted(e, 'items', 'items')}, chance {e['chance']:.3f})"
        lines.append(line)
    for e in results.get("extractive", []):
        b, t = e.get("base"), e.get("tuned")
        line = f"{e['name']:<20} {e['role']:<10} exact "
        if b and t:
            d = e["delta"]["f1"]
            line += (f"{b['exact']:.3f} → {t['exact']:.3f}   f1 {b['f1']:.3f} → {t['f1']:.3f}  {_change(d)}  "
                     f"({counted(e, 'items', 'items')})")
        else:
            line += f"{t['exact']:.3f}   f1 {t['f1']:.3f}  ({counted(e, 'items', 'items')})"
        lines.append(line)
    if results.get("generation"):
        lines.append(f"{'generation':<20} {len(results['generation'])} prompts (see the report)")
    le = results.get("lm_eval")
    if le:
        lines.append(f"{'lm-eval':<20} " + (le["skipped"] if "skipped" in le else ", ".join(le["tasks"])))
    for role, sp in (results.get("speed") or {}).items():
        if sp.get("tokens_per_s"):
            lines.append(f"{'speed':<20} {role:<10} {sp['tokens_per_s']:,.0f} tokens/s "
                         f"({sp['tokens']:,} tokens in {sp['seconds']:.1f} s of scoring)")
    root = results.get("_root")
    if root:
        lines.append(f"{'report':<20} {Path(root) / 'report.md'}")
        lines.append(f"{'results':<20} {eval_dir(Path(root)) / RESULTS_FILE}")
    if results.get("preference"):
        from affinage.eval.preference import format_line

        lines.append(format_line(results["preference"]))
    lines.append(f"{'time':<20} {results.get('seconds', 0):.0f} s")
    return "\n".join(lines)
