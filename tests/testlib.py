"""Helpers every test package imports (``from testlib import ...``): paths, ../shared, demo text.

Kept out of conftest.py on purpose: several test folders have their own conftest.py, and
``from conftest import`` would pick whichever was imported first.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "recipes" / "demo" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# prepared-data caches of test runs go to a throw-away folder, never to the user's ~/.cache/affinage
os.environ.setdefault("AFFINAGE_CACHE", tempfile.mkdtemp(prefix="affinage-test-cache-"))


def load_script(path: str):
    """A repository script (``bench/…``, ``scripts/…``) imported as a module, for tests of its functions."""
    file = REPO / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module  # dataclasses and pickling look their module up there
    spec.loader.exec_module(module)
    return module


def shared_dir() -> Path | None:
    """``../shared`` beside the checkout (real corpora and tokenizers), or None on a fresh clone."""
    path = Path(os.environ.get("AFFINAGE_SHARED", REPO.parent / "shared"))
    return path if (path / "data").is_dir() else None


needs_shared = pytest.mark.skipif(
    shared_dir() is None, reason="needs ../shared (real tokenizers/corpora), absent on a fresh clone"
)


def demo_texts(limit: int | None = None) -> list[str]:
    """The project's own French text (shipped in recipes/demo/data), for tokenizers and corpora."""
    texts: list[str] = []
    for path in sorted(DEMO_DATA.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if "text" in rec:
                texts.append(rec["text"])
            elif "messages" in rec:
                texts.extend(m["content"] for m in rec["messages"])
            else:
                texts.extend(str(v) for v in rec.values() if v)
    return texts[:limit] if limit else texts
