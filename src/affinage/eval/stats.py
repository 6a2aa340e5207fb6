"""Bootstrap confidence intervals: is a before/after difference real or noise?

Both models are scored on the same documents or items, so differences are *paired*: each
bootstrap resample draws units (documents, items) with replacement and recomputes both models'
figures on the same draw. The interval is the percentile interval of the resampled statistic.
A difference whose interval excludes 0 is reported as real at that confidence level; with few
units the interval is wide, and the report says the change is not established.

Units are not always independent: 557 passages cut from 20 novels are 20 draws of style, not
557. A set may therefore name a grouping field (``group_field``: the book, the source document);
the bootstrap then resamples whole *groups* with replacement (the cluster bootstrap), every unit of
a drawn group entering the statistic, and ``n_groups`` is reported beside ``n``. Below
:data:`MIN_GROUPS` groups (or :data:`MIN_UNITS` ungrouped units) the interval is not trusted and
``too_few`` is set: the report then says "too few to tell" instead of a verdict.

Every statistic here is a ratio of sums over units (a mean is Σvalue/Σ1), so resampling groups is
resampling their per-group sums: the cost is that of the number of groups, not of units.

Everything is seeded (``numpy.random.default_rng(seed)``), so a report is reproducible.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

_CELLS = 4_000_000  # resampled index cells per chunk (bounds memory for large sets)
#: fewer independent units (groups when grouped) than this and an interval is not trusted
MIN_GROUPS = 10
MIN_UNITS = 10


def group_sums(groups: Optional[Sequence], *columns: Sequence[float]) -> tuple[list[np.ndarray], int]:
    """Per-group sums of each column (units in first-seen group order) and the number of groups.

    With ``groups=None`` every unit is its own group and the columns are returned unchanged, so an
    ungrouped bootstrap draws exactly what it drew before grouping existed.
    """
    cols = [np.asarray(c, dtype=float) for c in columns]
    if groups is None:
        return cols, len(cols[0])
    if len(groups) != len(cols[0]):
        raise ValueError(f"{len(groups)} group labels for {len(cols[0])} units")
    _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    g = int(inverse.max()) + 1 if len(inverse) else 0
    return [np.bincount(inverse, weights=c, minlength=g) for c in cols], g


def _too_few(n_groups: int, grouped: bool) -> bool:
    return n_groups < (MIN_GROUPS if grouped else MIN_UNITS)


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


def _summary(delta: float, samples: np.ndarray, confidence: float, n: int, iterations: int,
             n_groups: Optional[int] = None) -> dict:
    lo, hi = _interval(samples, confidence)
    grouped = n_groups is not None
    out = {
        "delta": float(delta),
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "n": n,
        "iterations": iterations,
        "excludes_zero": bool(lo > 0 or hi < 0),
        "too_few": _too_few(n_groups if grouped else n, grouped),
    }
    if grouped:
        out["n_groups"] = n_groups
    return out


def _ratio_samples(num: np.ndarray, den: np.ndarray, rng, n: int, iterations: int) -> np.ndarray:
    return np.concatenate([num[idx].sum(1) / den[idx].sum(1) for idx in _indices(rng, n, iterations)])


def _with_groups(out: dict, n_groups: int, groups) -> dict:
    grouped = groups is not None
    out["too_few"] = _too_few(n_groups if grouped else out["n"], grouped)
    if grouped:
        out["n_groups"] = n_groups
    return out


def mean_ci(values: Sequence[float], *, groups: Optional[Sequence] = None, iterations: int = 2000,
            confidence: float = 0.95, seed: int = 1234) -> dict:
    """Mean of ``values`` with a bootstrap interval (e.g. one model's accuracy); ``groups`` resamples clusters."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    if groups is None:
        means = np.concatenate([v[idx].mean(axis=1) for idx in _indices(rng, len(v), iterations)])
        g = len(v)
    else:
        (sums, counts), g = group_sums(groups, v, np.ones_like(v))
        means = _ratio_samples(sums, counts, rng, g, iterations)
    lo, hi = _interval(means, confidence)
    out = {"value": float(v.mean()), "ci_low": lo, "ci_high": hi, "confidence": confidence, "n": len(v)}
    return _with_groups(out, g, groups)


def paired_mean_delta(a: Sequence[float], b: Sequence[float], *, groups: Optional[Sequence] = None,
                      iterations: int = 2000, confidence: float = 0.95, seed: int = 1234) -> dict:
    """``mean(b) - mean(a)`` over paired units (accuracy of tuned minus base); ``groups`` resamples clusters."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired values must be two non-empty lists of the same length")
    d = b - a
    rng = np.random.default_rng(seed)
    if groups is None:
        samples = np.concatenate([d[idx].mean(axis=1) for idx in _indices(rng, len(d), iterations)])
        return _summary(d.mean(), samples, confidence, len(d), iterations)
    (sums, counts), g = group_sums(groups, d, np.ones_like(d))
    return _summary(d.mean(), _ratio_samples(sums, counts, rng, g, iterations), confidence, len(d), iterations, g)


def ratio_ci(num: Sequence[float], den: Sequence[float], *, scale: float = 1.0, groups: Optional[Sequence] = None,
             iterations: int = 2000, confidence: float = 0.95, seed: int = 1234) -> dict:
    """``scale · Σnum / Σden`` with a bootstrap interval over units (one model's bits per byte)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    (gn, gd), g = group_sums(groups, num, den)
    rng = np.random.default_rng(seed)
    samples = scale * _ratio_samples(gn, gd, rng, g, iterations)
    lo, hi = _interval(samples, confidence)
    out = {"value": float(scale * num.sum() / den.sum()), "ci_low": lo, "ci_high": hi, "confidence": confidence, "n": len(num)}
    return _with_groups(out, g, groups)


def paired_ratio_delta(num_a: Sequence[float], num_b: Sequence[float], den: Sequence[float], *, scale: float = 1.0,
                       groups: Optional[Sequence] = None, iterations: int = 2000, confidence: float = 0.95,
                       seed: int = 1234) -> dict:
    """Change of ``scale · Σnum / Σden`` from a to b, absolute and relative, on the same resampled units.

    Used for bits per byte: ``num`` is each document's NLL, ``den`` its bytes (the same for both
    models), ``scale = 1/ln 2``. ``relative`` is ``b/a - 1`` with its own interval.
    """
    na, nb, dd = (np.asarray(x, dtype=float) for x in (num_a, num_b, den))
    if not (na.shape == nb.shape == dd.shape) or na.ndim != 1 or len(na) == 0:
        raise ValueError("paired values must be non-empty lists of the same length")
    (ga, gb, gd), g = group_sums(groups, na, nb, dd)
    rng = np.random.default_rng(seed)
    deltas, rels = [], []
    for idx in _indices(rng, g, iterations):
        sa, sb, sd = ga[idx].sum(1), gb[idx].sum(1), gd[idx].sum(1)
        deltas.append(scale * (sb - sa) / sd)
        rels.append(sb / sa - 1)
    deltas, rels = np.concatenate(deltas), np.concatenate(rels)
    out = _summary(scale * (nb.sum() - na.sum()) / dd.sum(), deltas, confidence, len(na), iterations,
                   g if groups is not None else None)
    lo, hi = _interval(rels, confidence)
    out["relative"] = {"delta": float(nb.sum() / na.sum() - 1), "ci_low": lo, "ci_high": hi}
    return out
