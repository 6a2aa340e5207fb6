"""Exact dedup's whitespace normalisation: ``" ".join(doc.split())``, the same as collapsing ``\\s+`` runs and stripping."""

from __future__ import annotations

import re
import sys

from affinage.data.filters import ExactDedup


def test_split_and_regex_whitespace_are_the_same_characters():
    # the normalisation was re.sub(r"\s+", " ", doc).strip(): same key for every document if both agree on whitespace
    regex = [c for c in map(chr, range(sys.maxunicode + 1)) if re.fullmatch(r"\s", c)]
    split = [c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()]
    assert regex == split and len(split) == 29
    doc = "\u3000 Le  tribunal\u00a0a\t\trendu\n\n sa décision.\u2029 "
    assert " ".join(doc.split()) == re.sub(r"\s+", " ", doc).strip() == "Le tribunal a rendu sa décision."


def test_exact_dedup_ignores_whitespace_only():
    d = ExactDedup()
    assert not d.is_duplicate("Le tribunal a rendu sa décision.")
    assert d.is_duplicate("  Le\u00a0tribunal a\nrendu   sa décision.\t")
    assert not d.is_duplicate("Le tribunal a rendu sa décision !")
