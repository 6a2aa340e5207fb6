"""Data preparation: sources → canonical records → chat template + loss mask → token ids → cached rows.

The path, one way: ``readers`` (files to located records) → ``formats`` (text/chat/alpaca/... to one
canonical shape) → ``spool`` (filters from ``filters``, ``decontam``; kept records to a temporary
file) → ``mixture`` (held-out split, weights) → ``tokenize`` (the worker pool; chat spans and the
loss mask from ``templates``) → ``rows`` (sample store, ``packing`` layouts, the split arrays) →
``cache`` (the folder, keyed by ``cache_key``) → ``collator`` (rows to Trainer batches; labels are
built there, once). ``prepare`` orchestrates; ``stats`` and ``console`` report. ``errors`` holds
``DataError``, the one exception type for data problems.
"""

from affinage.data.errors import DataError, SkipCounter

__all__ = ["DataError", "SkipCounter"]
