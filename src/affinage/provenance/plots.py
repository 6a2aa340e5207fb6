"""PNG plots for the report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

BASE_COLOR = "#9aa5b1"
TUNED_COLOR = "#1f5fa8"
EVAL_COLOR = "#d9822b"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": "affinage"})
    _plt().close(fig)
    return path


def loss_curve(metrics: Sequence[dict], path: Path, title: str = "") -> Optional[Path]:
    """Training loss per step, held-out loss as points; None when no loss was logged."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m]
    held = sorted({(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m and "step" in m})
    if not train and not held:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if train:
        ax.plot(*zip(*train), color=TUNED_COLOR, lw=1.6, label="training loss")
    if held:
        ax.plot(*zip(*held), "o-", color=EVAL_COLOR, lw=1.2, ms=4, label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _bars(ax, labels, base, tuned, base_err=None, tuned_err=None):
    import numpy as np

    x = np.arange(len(labels))
    w = 0.38
    if base is not None:
        ax.bar(x - w / 2, base, w, yerr=base_err, color=BASE_COLOR, label="base", capsize=3)
        ax.bar(x + w / 2, tuned, w, yerr=tuned_err, color=TUNED_COLOR, label="fine-tuned", capsize=3)
    else:
        ax.bar(x, tuned, w, yerr=tuned_err, color=TUNED_COLOR, label="model", capsize=3)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return x, w


def _err(entries, role, key):
    if not all(role in e and f"{key}_ci" in e[role] for e in entries):
        return None
    lo = [e[role][key] - e[role][f"{key}_ci"]["ci_low"] for e in entries]
    hi = [e[role][f"{key}_ci"]["ci_high"] - e[role][key] for e in entries]
    return [[max(0, v) for v in lo], [max(0, v) for v in hi]]


def perplexity_bars(entries: Sequence[dict], path: Path) -> Optional[Path]:
    """Bits per byte of each set, base vs fine-tuned, with 95% intervals and the relative change."""
    if not entries:
        return None
    plt = _plt()
    labels = [f"{e['name']}\n({e['role']})" for e in entries]
    has_base = all("base" in e for e in entries)
    base = [e["base"]["bits_per_byte"] for e in entries] if has_base else None
    tuned = [e["tuned"]["bits_per_byte"] for e in entries]
    fig, ax = plt.subplots(figsize=(max(4.8, 1.7 * len(entries) + 2), 4.1))
    x, w = _bars(ax, labels, base, tuned, _err(entries, "base", "bits_per_byte") if has_base else None,
                 _err(entries, "tuned", "bits_per_byte"))
    if has_base:
        for xi, e, t in zip(x, entries, tuned):
            rel = e["delta"]["bits_per_byte"]["relative"]["delta"]
            top = e["tuned"].get("bits_per_byte_ci", {}).get("ci_high", t)
            ax.annotate(f"{rel * 100:+.1f}%", (xi + w / 2, max(t, top)), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize=8, color=TUNED_COLOR, fontweight="bold")
    tops = [e[r].get("bits_per_byte_ci", {}).get("ci_high", e[r]["bits_per_byte"])
            for e in entries for r in ("base", "tuned") if r in e]
    ax.set_ylim(0, max(tops) * 1.15)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.legend(frameon=False, fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax.set_title("Held-out text: base vs fine-tuned", fontsize=10)
    return _save(fig, path)


def mcq_bars(entries: Sequence[dict], path: Path, metric: str = "acc") -> Optional[Path]:
    if not entries:
        return None
    plt = _plt()
    labels = [f"{e['name']}\n({e['items']} items)" for e in entries]
    has_base = all("base" in e for e in entries)
    base = [e["base"][metric] for e in entries] if has_base else None
    tuned = [e["tuned"][metric] for e in entries]
    fig, ax = plt.subplots(figsize=(max(4.8, 1.7 * len(entries) + 2), 3.9))
    _bars(ax, labels, base, tuned, _err(entries, "base", metric) if has_base else None, _err(entries, "tuned", metric))
    chance = sum(e.get("chance", 0.25) for e in entries) / len(entries)
    ax.axhline(chance, color="k", lw=0.8, ls=":", label=f"chance ({chance:.2f})")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"{metric} (higher is better)")
    ax.legend(frameon=False, fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax.set_title("Multiple choice: base vs fine-tuned", fontsize=10)
    return _save(fig, path)
