"""Helpers for the data tests: where ../shared is, real tokenizers, small recipes and files.

``../shared`` (next to the repository, or ``$AFFINAGE_SHARED``) holds real corpora and tokenizers.
Tests read it in place and skip when it is absent (a fresh clone has none).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("AFFINAGE_SHARED") or (REPO / ".." / "shared")).resolve()
HAS_SHARED = (SHARED / "tokenizers").is_dir() and (SHARED / "data").is_dir()
SHARED_REASON = "needs ../shared (real tokenizers/corpora), absent on a fresh clone"

needs_shared = pytest.mark.skipif(not HAS_SHARED, reason=SHARED_REASON)

REAL_TOKENIZERS = ("mistral-7b-instruct-v0.3", "qwen2.5-instruct", "lucie-7b-instruct")
# What each real template emits after an assistant reply (the model's stop token).
END_MARKER = {"mistral-7b-instruct-v0.3": "</s>", "qwen2.5-instruct": "<|im_end|>", "lucie-7b-instruct": "<|eot_id|>"}
# Templates that apply Jinja's ``trim`` to assistant content.
TRIMS_CONTENT = {"mistral-7b-instruct-v0.3": True, "qwen2.5-instruct": False, "lucie-7b-instruct": True}

SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<pad>",
    "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]",
]

# Written for these tests (not copied from ../shared): used to train the small tokenizer when
# ../shared is absent, so that template and dataset tests still run on a fresh clone.
FALLBACK_FRENCH = """\
Le tribunal a rendu sa décision après une longue délibération. Les parties ont été entendues.
Un contrat se forme par la rencontre d'une offre et d'une acceptation. Chacun est libre de contracter.
L'été dernier, nous sommes allés à la bibliothèque municipale pour lire des romans du dix-neuvième siècle.
Où se trouve la préfecture ? Elle est près de la gare, à côté du théâtre et de l'hôpital.
Les élèves étudient l'histoire de France : la Révolution, l'Empire, la Restauration et la République.
Quelle est la capitale de la Bretagne ? C'est Rennes, une ville étudiante très animée.
"""


def training_text() -> str:
    if HAS_SHARED:
        parts, size = [], 0
        with open(SHARED / "data" / "fr_legal_codes.jsonl", encoding="utf-8") as f:
            for line in f:
                parts.append(json.loads(line)["text"])
                size += len(parts[-1])
                if size > 6000:
                    break
        return "\n".join(parts)
    return FALLBACK_FRENCH * 4


_REAL: dict = {}


def real_tokenizer(name: str):
    """Load (once per session) a real tokenizer from ../shared/tokenizers/<name>."""
    if not HAS_SHARED:
        pytest.skip(SHARED_REASON)
    if name not in _REAL:
        from transformers import AutoTokenizer

        _REAL[name] = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / name))
    return _REAL[name]


def make_recipe(sources, task="sft", chat_template=None, seed=42, **data):
    """A minimal valid Recipe around ``sources`` (dicts of SourceSpec fields)."""
    from affinage.recipe.schema import Recipe

    return Recipe.model_validate(
        {
            "name": "t",
            "task": task,
            "seed": seed,
            "model": {"name_or_path": "tiny", "chat_template": chat_template},
            "data": {"sources": sources, **data},
            "training": {"global_batch_size": 1, "duration": "1 steps"},
        }
    )


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
