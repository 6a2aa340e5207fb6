"""The report's section on held-out preference pairs (numbers from ``affinage.eval.preference``) and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from affinage.eval.results import change_text, verdict_text
from affinage.provenance.plots import BASE_COLOR, TUNED_COLOR, _plt, _save


def report_section(e: dict, root: Path, images: Path) -> list[str]:
    """Markdown lines (and a plot) for report.md."""
    out = ["### Preference pairs (held out)\n",
           "Each held-out pair is scored by the summed log-likelihood of its chosen and rejected completions (the "
           "prompt is not scored). Accuracy: share of pairs where the chosen reply is the more likely one. Reward "
           "margin: DPO's implicit reward of the aligned model with the model before alignment as reference, "
           f"β = {e.get('beta')}.\n"]
    b, t = e.get("base"), e.get("tuned")
    if not t:
        return out + ["No held-out pairs (set data.heldout_fraction).\n"]
    if b:
        d, dm, dn = e["delta"]["accuracy"], e["delta"]["margin"], e["delta"]["accuracy_norm"]
        rm, ra = e["reward_margin"], e["reward_accuracy"]
        out += ["| pairs | accuracy before → after | change [95% interval] | verdict | log-lik. margin before → after | change [95% interval] | reward margin [95% interval] | reward > 0 |",
                "|---:|---|---|---|---|---|---|---:|",
                f"| {e['pairs']} | {b['accuracy']:.3f} → {t['accuracy']:.3f} | {change_text(d)} | "
                f"{verdict_text(d)} | {b['margin']:+.2f} → {t['margin']:+.2f} | "
                f"{change_text(dm, 2)} | {change_text(rm, key='value')} | "
                f"{ra['value']:.3f} |", "",
                f"Per-token accuracy (mean log-likelihood per completion token, which does not favour the shorter reply): "
                f"{b['accuracy_norm']:.3f} → {t['accuracy_norm']:.3f}, change {change_text(dn)} "
                f"({verdict_text(dn)}).\n"]
    else:
        out += ["| pairs | accuracy | log-likelihood margin |", "|---:|---:|---:|",
                f"| {e['pairs']} | {t['accuracy']:.3f} | {t['margin']:+.2f} |", ""]
    try:
        png = plot(e, images / "preference.png")
        if png is not None:
            out.append(f"![preference accuracy, before vs after alignment]({png.relative_to(root).as_posix()})\n")
    except Exception as ex:  # a plot must never hide the numbers
        out.append(f"(preference plot failed: {type(ex).__name__}: {ex})\n")
    return out


def plot(e: dict, path: Path) -> Optional[Path]:

    roles = [r for r in ("base", "tuned") if r in e]
    if not roles:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(7.6, 3.4))
    labels = ["before" if r == "base" else "after" for r in roles]
    colors = [BASE_COLOR if r == "base" else TUNED_COLOR for r in roles]
    for ax, key, title in ((axes[0], "accuracy", "preference accuracy (summed log-lik.)"),
                           (axes[1], "accuracy_norm", "preference accuracy (per token)")):
        vals = [e[r][key] for r in roles]
        ci = [e[r][f"{key}_ci"] for r in roles]
        err = np.array([[v - c["ci_low"] for v, c in zip(vals, ci)], [c["ci_high"] - v for v, c in zip(vals, ci)]])
        ax.bar(labels, vals, color=colors, yerr=err, capsize=4)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="#888", lw=0.8, ls="--")
    fig.suptitle(f"{e['pairs']} held-out pairs, 95% bootstrap intervals", fontsize=9)
    return _save(fig, path)
