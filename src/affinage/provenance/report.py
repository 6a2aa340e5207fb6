"""``report.md``: what a run did and what it changed, readable in any Markdown viewer.

Sections: training (loss curve, summary), evaluation (base vs fine-tuned tables with bootstrap
intervals and plots), generation samples, lm-eval, and links to the provenance files. Every
number comes from files in the run directory (``summary.json``, ``metrics.jsonl``,
``eval/results.json``, ``provenance.json``), so the report can be rebuilt at any time
(``affinage card RUN_DIR``). Plots are PNG files in ``eval/`` next to the results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from affinage.eval.results import change_text, counted, eval_dir, read_results
from affinage.provenance import plots

REPORT_FILE = "report.md"  # RunDir.report


def _f(x: Optional[float], digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f}%"


def _too_few(d: dict) -> str | None:
    """The verdict when the set has too few independent units (groups, else documents/items) to tell."""
    if not d.get("too_few"):
        return None
    units = f"{d['n_groups']} groups" if "n_groups" in d else f"{d['n']} units"
    return f"too few to tell ({units})"


def ppl_verdict(e: dict) -> str:
    d = e["delta"]["bits_per_byte"]
    lower = d["delta"] < 0
    if _too_few(d):
        return _too_few(d)
    if not d["excludes_zero"]:
        return "no clear change (the interval includes 0)"
    if e["role"] == "domain":
        return "**better** (real: the interval excludes 0)" if lower else "**worse** (real: the interval excludes 0)"
    rel = d["relative"]["delta"]
    if lower:
        return "better too (real)"
    return ("slightly worse (real, but small: under 5%)" if rel < 0.05 else "**worse** (real): forgetting")


def mcq_verdict(d: dict) -> str:
    if _too_few(d):
        return _too_few(d)
    if not d["excludes_zero"]:
        return "not established (the interval includes 0)"
    return "**better** (real)" if d["delta"] > 0 else "**worse** (real)"


def _training_section(run, root: Path, out: list[str], images: Path) -> None:
    summary = json.loads(run.summary.read_text(encoding="utf-8")) if run.summary.is_file() else None
    metrics = run.read_metrics()
    out.append("## Training\n")
    if summary is None:
        out.append("No `summary.json` yet: the training has not finished.\n")
    else:
        loss = (f"{summary['loss_first']:.4f} → {summary['loss_last']:.4f}"
                if summary.get("loss_first") is not None else "n/a")
        out += [
            "| | |", "|---|---|",
            f"| status | {'complete' if summary.get('completed') else 'stopped early'} |",
            f"| steps | {summary.get('steps')}/{summary.get('max_steps')} (world size {summary.get('world_size')}, "
            f"accumulation {summary.get('gradient_accumulation')}) |",
            f"| samples | {summary.get('train_samples')} train, {summary.get('heldout_samples')} held out |",
            f"| training loss | {loss} |",
        ]
        if summary.get("eval_loss") is not None:
            out.append(f"| held-out loss (end) | {summary['eval_loss']:.4f} |")
        if summary.get("tokens_seen"):
            out.append(f"| tokens processed (all sessions) | {summary['tokens_seen']:,} |")
        if summary.get("steps_this_session") is not None:
            out.append(f"| last session | {summary['steps_this_session']} steps, "
                       f"{summary.get('tokens_this_session') or 0:,} tokens |")
        # summary.json is written by the last session; the manifest's compute.train_seconds sums all sessions
        out.append(f"| wall time of the last session | {summary.get('seconds', 0):.0f} s |\n")
    try:
        png = plots.loss_curve(metrics, images / "loss.png", title=run.root.name)
    except Exception as e:  # a plot must never hide the numbers
        png, _ = None, out.append(f"(loss plot failed: {type(e).__name__}: {e})\n")
    if png:
        out.append(f"![training and held-out loss]({png.relative_to(root).as_posix()})\n")


def _eval_section(results: dict, root: Path, out: list[str], images: Path) -> None:
    models = results.get("models", {})
    out.append("## Evaluation: base vs fine-tuned\n")
    for role in ("base", "tuned"):
        if role in models:
            m = models[role]
            desc = m["description"].split(" (", 1)
            detail = desc[1].rstrip(")") if len(desc) == 2 else desc[0]
            out.append(f"- **{'base' if role == 'base' else 'fine-tuned'}**: {detail}, {m['parameters']:,} parameters")
    s = results.get("settings", {})
    out.append(f"- settings: windows of {s.get('max_length')} tokens, {s.get('dtype')} on {s.get('device')}, "
               f"{int(s.get('confidence', 0.95) * 100)}% intervals from {s.get('bootstrap')} paired bootstrap resamples "
               f"(seed {s.get('seed')})" + (f", first {s['limit']} records per set only" if s.get("limit") else "") + "\n")
    has_base = "base" in models
    ppl = results.get("perplexity") or []
    if ppl:
        out.append("### Held-out text (bits per byte, lower is better)\n")
        out.append("Bits per byte = total negative log-likelihood / (ln 2 × UTF-8 bytes): it does not depend on the "
                   "tokenizer. *domain* sets are what the training should improve; *forgetting* sets are general "
                   "text that should not get much worse.\n")
        if has_base:
            out += ["| set | role | documents | base | fine-tuned | change | 95% interval | verdict |",
                    "|---|---|---:|---:|---:|---:|---|---|"]
            for e in ppl:
                d = e["delta"]["bits_per_byte"]["relative"]
                out.append(f"| {e['name']} | {e['role']} | {counted(e, 'documents')} | {_f(e['base']['bits_per_byte'])} | "
                           f"{_f(e['tuned']['bits_per_byte'])} | {_pct(d['delta'])} | "
                           f"[{_pct(d['ci_low'])}, {_pct(d['ci_high'])}] | {ppl_verdict(e)} |")
            out.append("")
            out += ["| set | token perplexity base → fine-tuned | word perplexity base → fine-tuned | tokens |",
                    "|---|---|---|---:|"]
            for e in ppl:
                out.append(f"| {e['name']} | {_f(e['base']['token_perplexity'], 2)} → {_f(e['tuned']['token_perplexity'], 2)} | "
                           f"{_f(e['base']['word_perplexity'], 1)} → {_f(e['tuned']['word_perplexity'], 1)} | "
                           f"{e['tuned']['tokens']:,} |")
        else:
            out += ["| set | role | documents | bits per byte | token perplexity |", "|---|---|---:|---:|---:|"]
            for e in ppl:
                out.append(f"| {e['name']} | {e['role']} | {counted(e, 'documents')} | {_f(e['tuned']['bits_per_byte'])} | "
                           f"{_f(e['tuned']['token_perplexity'], 2)} |")
        out.append("")
        try:
            png = plots.perplexity_bars(ppl, images / "perplexity.png")
            out.append(f"![bits per byte, base vs fine-tuned]({png.relative_to(root).as_posix()})\n")
        except Exception as e:
            out.append(f"(perplexity plot failed: {type(e).__name__}: {e})\n")
    items = results.get("mcq") or []
    if items:
        out.append("### Multiple choice (accuracy, higher is better)\n")
        out.append("Each choice is scored by its log-likelihood after the question (lm-eval's method). `acc` takes the "
                   "most likely choice; `acc_norm` divides by the choice's length in characters first. *chance* is the "
                   "accuracy of a random pick (1 / number of choices, averaged over items).\n")
        if has_base:
            out += ["| set | role | items | shots | chance | acc base → fine-tuned | change [95% interval] | verdict | acc_norm base → fine-tuned | change [95% interval] |",
                    "|---|---|---:|---:|---:|---|---|---|---|---|"]
            for e in items:
                da, dn = e["delta"]["acc"], e["delta"]["acc_norm"]
                out.append(f"| {e['name']} | {e['role']} | {counted(e, 'items')} | {e['num_fewshot']} | {_f(e.get('chance'), 3)} | "
                           f"{e['base']['acc']:.3f} → {e['tuned']['acc']:.3f} | {change_text(da)} | "
                           f"{mcq_verdict(da)} | {e['base']['acc_norm']:.3f} → {e['tuned']['acc_norm']:.3f} | "
                           f"{change_text(dn)} |")
        else:
            out += ["| set | items | shots | chance | acc | acc_norm |", "|---|---:|---:|---:|---:|---:|"]
            for e in items:
                out.append(f"| {e['name']} | {counted(e, 'items')} | {e['num_fewshot']} | {_f(e.get('chance'), 3)} | "
                           f"{e['tuned']['acc']:.3f} | {e['tuned']['acc_norm']:.3f} |")
        out.append("")
        try:
            png = plots.mcq_bars(items, images / "mcq.png")
            out.append(f"![accuracy, base vs fine-tuned]({png.relative_to(root).as_posix()})\n")
        except Exception as e:
            out.append(f"(accuracy plot failed: {type(e).__name__}: {e})\n")
    qa = results.get("extractive") or []
    if qa:
        out.append("### Extractive question answering (exact match and F1, higher is better)\n")
        out.append("The model answers greedily, up to the first newline; answers and gold answers are compared after "
                   "lower-casing and removing punctuation and articles (SQuAD's scoring, French articles), taking the "
                   "best over the gold answers.\n")
        if has_base:
            out += ["| set | role | items | exact base → fine-tuned | F1 base → fine-tuned | F1 change [95% interval] | verdict |",
                    "|---|---|---:|---|---|---|---|"]
            for e in qa:
                d = e["delta"]["f1"]
                out.append(f"| {e['name']} | {e['role']} | {counted(e, 'items')} | {e['base']['exact']:.3f} → {e['tuned']['exact']:.3f} | "
                           f"{e['base']['f1']:.3f} → {e['tuned']['f1']:.3f} | {change_text(d)} | "
                           f"{mcq_verdict(d)} |")
        else:
            out += ["| set | items | exact | F1 |", "|---|---:|---:|---:|"]
            for e in qa:
                out.append(f"| {e['name']} | {counted(e, 'items')} | {e['tuned']['exact']:.3f} | {e['tuned']['f1']:.3f} |")
        out.append("")
    speed = results.get("speed") or {}
    if any(v.get("tokens_per_s") for v in speed.values()):
        out.append("Scoring speed (perplexity and multiple choice, packed rows): " + "; ".join(
            f"{role} {v['tokens_per_s']:,.0f} tokens/s ({v['tokens']:,} tokens in {v['seconds']:.1f} s)"
            for role, v in speed.items() if v.get("tokens_per_s")) + ".\n")
    if results.get("preference"):
        from affinage.provenance.preference_report import report_section

        out += report_section(results["preference"], root, images)
    gens = results.get("generation") or []
    if gens:
        out.append("### Samples (greedy decoding, fixed seed)\n")
        for g in gens:
            out.append(f"**{_md_inline(g['prompt'])}**\n")
            for role, label in (("base", "base"), ("tuned", "fine-tuned")):
                if role in g:
                    out.append(f"- *{label}*: …{_md_inline(g[role])}")
            out.append("")
    le = results.get("lm_eval")
    if le:
        out.append("### lm-evaluation-harness\n")
        if "skipped" in le:
            out.append(f"Skipped: {le['skipped']}\n")
        else:
            out += ["| task | metric | base | fine-tuned | change [95% interval] |", "|---|---|---:|---:|---|"]
            for task, per in le["tasks"].items():
                metrics = sorted(set(per.get("tuned", {}).get("metrics", {})) | set(per.get("base", {}).get("metrics", {})))
                for m in metrics:
                    b = per.get("base", {}).get("metrics", {}).get(m)
                    t = per.get("tuned", {}).get("metrics", {}).get(m)
                    d = per.get("delta", {}).get(m)
                    dd = change_text(d) if d else ""
                    out.append(f"| {task} | {m} | {_f(b, 3)} | {_f(t, 3)} | {dd} |")
            out.append("")


def _md_inline(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|").replace("*", "\\*").replace("_", "\\_") or "(nothing)"


def write_report(root: str | Path, *, run=None, results: Optional[dict] = None, manifest: Optional[dict] = None) -> Path:
    """Write ``root/report.md`` (and its plots) from whatever the run directory holds."""
    from affinage.run import RunDir, write_text

    root = Path(root)
    images = eval_dir(root)
    results = results if results is not None else read_results(root)
    if manifest is None and RunDir(root).provenance.is_file():
        manifest = json.loads(RunDir(root).provenance.read_text(encoding="utf-8"))
    name = (results or {}).get("run") or (run.root.name if run is not None else root.name)
    out: list[str] = [f"# Run report: {name}\n"]
    if manifest:
        r = manifest.get("run", {})
        if r.get("description"):
            out.append(f"{r['description']}\n")
        bm = manifest.get("base_model", {})
        out.append(f"Task `{r.get('task')}`, method `{r.get('method')}`, base model `{bm.get('name_or_path')}`"
                   + (f" (random init, seed {bm['seed']})" if bm.get("init") == "random" else "") + ".\n")
    if run is not None:
        _training_section(run, root, out, images)
    if results:
        _eval_section(results, root, out, images)
    else:
        out.append("## Evaluation\n\nNot run yet: `affinage eval " + str(root) + "` compares the fine-tuned model "
                   "with its base on the recipe's `eval:` sets.\n")
    rd = RunDir(root)
    links = [(p.relative_to(root).as_posix(), d) for p, d in (
                 (rd.provenance, "provenance manifest (data hashes, licences, software, compute)"),
                 (rd.root / "ai_act_summary.md", "EU AI Act training-content summary (draft)"),
                 (rd.final / "README.md", "model card"), (rd.eval_results, "all evaluation numbers"),
                 (rd.eval / "details.jsonl", "per document / item scores"))
             if p.exists()]
    if links:
        out.append("## Files\n")
        out += [f"- [`{p}`]({p}): {d}" for p, d in links]
        out.append("")
    if manifest and manifest.get("energy", {}).get("kwh") is not None:
        en = manifest["energy"]
        out.append(f"Training energy ≈ {en['kwh']:.3g} kWh, ≈ {en['co2e_g']:.3g} g CO2e ({en['summary']}).\n")
    return write_text(rd.report, "\n".join(out))
