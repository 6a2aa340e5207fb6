"""A small, dependency-free language estimate for data sources (share of characters per language).

Each document is assigned the language whose most frequent function words it contains most
often (at least 3 hits and 1.5 times the runner-up), else ``und`` (undetermined: too short,
code, numbers, a mix). It separates French from English, German, Spanish, Italian, Portuguese
and Dutch reliably on paragraphs; it is an estimate for documentation, not a filter.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

STOPWORDS: dict[str, frozenset[str]] = {
    "fr": frozenset("de le la les des du un une et est que qui dans pour pas sur au aux ce cette il elle ils nous vous "
                    "sont avec par plus ou se sa son ses leur été être ne mais comme tout aussi très".split()),
    "en": frozenset("the of and to in is that for it with as was on be by are this from at or an have not which his "
                    "her were they their has been would will".split()),
    "de": frozenset("der die das und ist nicht ein eine zu den mit von sich des auf für im dem auch es wird werden "
                    "sind wie bei oder".split()),
    "es": frozenset("de el los las y que en un una es por con para del se no al lo su como más pero sus fue".split()),
    "it": frozenset("il di e che un una per non è del della sono con si gli alla nel come anche questo".split()),
    "pt": frozenset("o os de e que do da em um uma para com não no na se por dos mais como foi".split()),
    "nl": frozenset("de het een en van is dat op te in zijn niet met voor die ook maar bij".split()),
}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def detect(text: str) -> str:
    """ISO 639-1 code of the most likely language of ``text``, or ``und``."""
    words = [w.lower() for w in _WORD.findall(text[:5000])]
    hits = {lang: sum(1 for w in words if w in sw) for lang, sw in STOPWORDS.items()}
    ranked = sorted(hits.items(), key=lambda kv: -kv[1])
    (best, n1), (_, n2) = ranked[0], ranked[1]
    if n1 >= 3 and n1 >= 1.5 * n2:
        return best
    return "und"


def shares(texts: Iterable[str]) -> tuple[dict[str, float], int, int]:
    """(share of characters per language, documents, characters) over ``texts``."""
    chars: Counter = Counter()
    docs = 0
    for t in texts:
        if not t:
            continue
        chars[detect(t)] += len(t)
        docs += 1
    total = sum(chars.values())
    return ({k: round(v / total, 4) for k, v in chars.most_common()} if total else {}), docs, total
