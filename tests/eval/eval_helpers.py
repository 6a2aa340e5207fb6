"""Shared helpers of the evaluation and provenance tests: corpora (../shared when present), a constant model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from testlib import DEMO_DATA, shared_dir


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread per test module that imports this fixture: tiny models gain nothing from a second
    thread, and on a shared 2-core machine two threads per process oversubscribe the cores (measured under
    load: the eval and provenance tests take 20 s with one thread, 140 s with the default two)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def legal_file() -> Path:
    """French law, one record per line: the real legal codes in ../shared, else the demo's law paragraphs."""
    shared = shared_dir()
    return shared / "data" / "fr_legal_codes.jsonl" if shared else DEMO_DATA / "droit.jsonl"


def general_file() -> Path:
    """General French prose: 19th-century novels in ../shared, else the demo's general paragraphs."""
    shared = shared_dir()
    return shared / "data" / "fr_literature_roman19.jsonl" if shared else DEMO_DATA / "culture_generale.jsonl"


def texts(path: Path, start: int = 0, n: int = 8, max_chars: int | None = None) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i < start:
                continue
            t = json.loads(line)["text"]
            out.append(t[:max_chars] if max_chars else t)
            if len(out) >= n:
                break
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


class ConstantModel(torch.nn.Module):
    """A "language model" whose next-token distribution is always softmax(w): log-likelihoods are hand-computable."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(logits.float(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        b, n = input_ids.shape
        return SimpleNamespace(logits=self.w.expand(b, n, -1))


#: law questions written for these tests (cloze form, facts of French law)
LAW_ITEMS = [
    {"question": "Le Code civil a été promulgué en", "choices": ["1804", "1958", "1905", "1789"], "answer": 0},
    {"question": "Le Sénat est renouvelé par moitié tous les", "choices": ["deux ans", "trois ans", "cinq ans", "six ans"], "answer": 1},
    {"question": "La loi de séparation des Églises et de l'État date de", "choices": ["1881", "1901", "1905", "1946"], "answer": 2},
    {"question": "Un contrat se forme par la rencontre d'une offre et", "choices": ["d'une acceptation", "d'un jugement", "d'un décret", "d'une grève"], "answer": 0},
    {"question": "En cas de cohabitation, le Premier ministre est issu de", "choices": ["la majorité de l'Assemblée nationale", "la Cour de cassation", "la famille royale", "l'armée"], "answer": 0},
    {"question": "La majorité civile est fixée à", "choices": ["seize ans", "dix-huit ans", "vingt et un ans", "vingt-cinq ans"], "answer": 1},
]
