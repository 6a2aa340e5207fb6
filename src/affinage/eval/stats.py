"""Bootstrap confidence intervals: is a before/after difference real or noise?

Both models are scored on the same documents or items, so differences are *paired*: each
bootstrap resample draws units (documents, items) with replacement and recomputes both models'
figures on the same draw. The interval is the percentile interval of the resampled statistic.
A difference whose interval excludes 0 is reported as real at that confidence level; with few
units the interval is wide, and the report says the change is not established.

Everything is seeded (``numpy.random.default_rng(seed)``), so a report is reproducible.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_CELLS = 4_000_000  # resampled index cells per chunk (bounds memory for large sets)


def _indices(rng, n: int, iterations: int):
    chunk = max(1, _CELLS // max(n, 1))
    done = 0
    while done < iterations:
        k = min(chunk, iterations - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(samples, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _summary(delta: float, samples: np.ndarray, confidence: float, n: int, iterations: int) -> dict:
    lo, hi = _interval(samples, confidence)
    return {
        "delta": float(delta),
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "n": n,
        "iterations": iterations,
        "excludes_zero": bool(lo > 0 or hi < 0),
    }


def mean_ci(values: Sequence[float], *, iterations: int = 2000, confidence: float = 0.95, seed: int = 1234) -> dict:
    """Mean of ``values`` with a bootstrap interval (e.g. one model's accuracy)."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.concatenate([v[idx].mean(axis=1) for idx in _indices(rng, len(v), iterations)])
    lo, hi = _interval(means, confidence)
    return {"value": float(v.mean()), "ci_low": lo, "ci_high": hi, "confidence": confidence, "n": len(v)}


def paired_mean_delta(a: Sequence[float], b: Sequence[float], *, iterations: int = 2000, confidence: float = 0.95,
                      seed: int = 1234) -> dict:
    """``mean(b) - mean(a)`` over paired units (accuracy of tuned minus base)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired values must be two non-empty lists of the same length")
    d = b - a
    rng = np.random.default_rng(seed)
    samples = np.concatenate([d[idx].mean(axis=1) for idx in _indices(rng, len(d), iterations)])
    return _summary(d.mean(), samples, confidence, len(d), iterations)


def ratio_ci(num: Sequence[float], den: Sequence[float], *, scale: float = 1.0, iterations: int = 2000,
             confidence: float = 0.95, seed: int = 1234) -> dict:
    """``scale · Σnum / Σden`` with a bootstrap interval over units (one model's bits per byte)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    rng = np.random.default_rng(seed)
    samples = np.concatenate([scale * num[idx].sum(1) / den[idx].sum(1) for idx in _indices(rng, len(num), iterations)])
    lo, hi = _interval(samples, confidence)
    return {"value": float(scale * num.sum() / den.sum()), "ci_low": lo, "ci_high": hi, "confidence": confidence, "n": len(num)}


def paired_ratio_delta(num_a: Sequence[float], num_b: Sequence[float], den: Sequence[float], *, scale: float = 1.0,
                       iterations: int = 2000, confidence: float = 0.95, seed: int = 1234) -> dict:
    """Change of ``scale · Σnum / Σden`` from a to b, absolute and relative, on the same resampled units.

    Used for bits per byte: ``num`` is each document's NLL, ``den`` its bytes (the same for both
    models), ``scale = 1/ln 2``. ``relative`` is ``b/a - 1`` with its own interval.
    """
    na, nb, dd = (np.asarray(x, dtype=float) for x in (num_a, num_b, den))
    if not (na.shape == nb.shape == dd.shape) or na.ndim != 1 or len(na) == 0:
        raise ValueError("paired values must be non-empty lists of the same length")
    rng = np.random.default_rng(seed)
    deltas, rels = [], []
    for idx in _indices(rng, len(na), iterations):
        sa, sb, sd = na[idx].sum(1), nb[idx].sum(1), dd[idx].sum(1)
        deltas.append(scale * (sb - sa) / sd)
        rels.append(sb / sa - 1)
    deltas, rels = np.concatenate(deltas), np.concatenate(rels)
    out = _summary(scale * (nb.sum() - na.sum()) / dd.sum(), deltas, confidence, len(na), iterations)
    lo, hi = _interval(rels, confidence)
    out["relative"] = {"delta": float(nb.sum() / na.sum() - 1), "ci_low": lo, "ci_high": hi}
    return out
