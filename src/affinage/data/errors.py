"""Errors and skip accounting shared by the data modules.

Data problems are the researcher's to fix, so they get one exception type whose message says
where (file:line) and what to do, never a bare KeyError from deep inside tokenization.
"""

from __future__ import annotations

from affinage.errors import UserError
from dataclasses import dataclass, field


class DataError(UserError, ValueError):
    """A data source, record or chat template that cannot be used as it is; the message says the fix.

    ``where`` (file:line) and ``reason`` (a short category such as "bad JSON") are kept apart from
    the message so that skip mode can count reasons without parsing text.
    """

    def __init__(self, message: str, *, where: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.where = where
        self.reason = reason or message


@dataclass
class SkipCounter:
    """Records skipped under ``on_bad_record: skip``: a count per reason and the first locations.

    Kept so that skipping is never silent: the numbers go into ``data_stats.json``.
    """

    max_examples: int = 20
    count: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str, detail: str | None = None) -> None:
        self.count += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            text = detail or f"{where}: {reason}"
            self.examples.append(text if len(text) <= 300 else text[:297] + "...")

    def add_error(self, err: DataError) -> None:
        self.add(err.where or "?", err.reason, str(err))

    def as_dict(self) -> dict:
        return {"count": self.count, "reasons": dict(self.reasons), "examples": list(self.examples)}
