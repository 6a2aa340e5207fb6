"""Data preparation: sources → canonical records → chat template + loss mask → token ids.

Modules: ``readers`` (files to located records), ``formats`` (text/chat/alpaca to one canonical
shape), ``templates`` (assistant spans and tokenization), ``dataset`` (mixtures, held-out split,
statistics), ``collate`` (padding and loss-mask checks; imports torch). ``errors`` holds
``DataError``, the one exception type for data problems.
"""

from affinage.data.errors import DataError, SkipCounter

__all__ = ["DataError", "SkipCounter"]
