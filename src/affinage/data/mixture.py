"""The mixture: source names, held-out split and weights (repeat factors), all seeded.

Order matters and is fixed: held-out records are chosen per source first, weights apply to the
training part only, so no held-out record is ever trained on, even with weight 2. Every random
choice is seeded from ``recipe.seed`` and the source's name, so the same recipe gives the same
split and mixture on any machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np

from affinage.data.errors import DataError
from affinage.data.readers import source_path


def round_half_up(x: float) -> int:
    """Round like people do (2.5 → 3), not like ``round`` (banker's rounding, 2.5 → 2)."""
    return int(math.floor(x + 0.5))


def source_names(specs) -> list[str]:
    """A unique, readable name per source: ``name``, else the file or folder name."""
    names: list[str] = []
    for i, s in enumerate(specs):
        base = s.name or source_path(s).name or f"source{i}"
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def weighted_indices(n: int, weight: float, rng: random.Random) -> list[int]:
    """Indices of ``n`` records repeated by ``weight``: floor(weight) full copies plus a seeded subset.

    0.5 → a deterministic half, 2.0 → every record twice, 1.5 → all once plus half again.
    """
    whole = int(math.floor(weight))
    extra = round_half_up((weight - whole) * n)
    out = [i for _ in range(whole) for i in range(n)]
    out += sorted(rng.sample(range(n), min(extra, n)))
    return out


def heldout_counts(sizes: list[int], fraction: float, cap: Optional[int]) -> list[int]:
    """Held-out records per source: ``fraction`` of each, the total capped at ``cap`` (shared in proportion).

    At least one record of each source stays in training.
    """
    want = [min(round_half_up(fraction * n), max(n - 1, 0)) for n in sizes]
    if cap is None or sum(want) <= cap:
        return want
    total = sum(want)
    exact = [w * cap / total for w in want]
    counts = [int(math.floor(e)) for e in exact]
    by_remainder = sorted(range(len(want)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: cap - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class SourceSplit:
    """How one source's kept records are used: held out, or trained on ``uses`` times."""

    heldout: set[int]
    uses: np.ndarray  # int64 [records]: 1 for a held-out record, else its number of training uses (0 leaves it out)

    @property
    def heldout_records(self) -> int:
        return len(self.heldout)

    @property
    def train_records(self) -> int:
        return len(self.uses) - len(self.heldout)

    @property
    def train_records_weighted(self) -> int:
        return int(self.uses.sum()) - len(self.heldout)


def split_source(name: str, n: int, heldout: int, weight: float, seed: int) -> SourceSplit:
    """Choose ``heldout`` of the source's ``n`` records, then weight the others (``weighted_indices``)."""
    held = set(random.Random(f"{seed}/heldout/{name}").sample(range(n), heldout)) if n else set()
    train = [i for i in range(n) if i not in held]
    picks = weighted_indices(len(train), weight, random.Random(f"{seed}/weight/{name}"))
    per_train = np.bincount(np.asarray(picks, dtype=np.int64), minlength=len(train)) if picks else np.zeros(len(train), np.int64)
    uses = np.ones(n, dtype=np.int64)
    if train:
        uses[np.asarray(train, dtype=np.int64)] = per_train
    return SourceSplit(held, uses)


def check_kind(name: str, fmt, kind: str, task: str) -> None:
    """A source's records must suit the task: raw text for cpt, conversations for sft."""
    if task == "sft" and kind == "text":
        raise DataError(
            f"data source {name!r} holds raw text (format {fmt}) but task is sft, which trains on assistant turns: "
            "use task: cpt for raw text, or chat/alpaca records for sft"
        )
    if task == "cpt" and kind == "chat":
        raise DataError(
            f"data source {name!r} holds chat records (format {fmt}) but task is cpt, which reads raw text: use task: sft "
            "for chat data, or set format: text and text_field for a text field"
        )
