"""Fixtures for the model tests: tiny offline model folders (built once per session) and recipes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """``<repo>/../shared``, or ``$AFFINAGE_SHARED``."""
    return Path(os.environ.get("AFFINAGE_SHARED", REPO.parent / "shared"))


@pytest.fixture
def real_tokenizers() -> Path:
    folder = shared_dir() / "tokenizers"
    if not (folder / "lucie-7b-instruct" / "config.json").is_file():
        pytest.skip(f"real tokenizers not found in {folder} (set AFFINAGE_SHARED to the shared/ folder)")
    return folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the network; the HF cache is an empty folder unless a test builds one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    from affinage.model.tiny import save_tiny_model_folder

    root = tmp_path_factory.mktemp("tiny")
    return {mt: save_tiny_model_folder(root / mt, mt, seed=7) for mt in ("llama", "mistral", "qwen2")}


@pytest.fixture
def make_recipe():
    return _make_recipe


def _make_recipe(model_path, kind: str = "lora", seed: int = 42, **model_kw):
    """A valid Recipe around a model folder; ``model_kw`` overrides model keys, ``lora=``/``quantization=`` the method's."""
    from affinage.recipe.schema import Recipe

    lora = model_kw.pop("lora", None)
    quant = model_kw.pop("quantization", None)
    method: dict = {"kind": kind}
    if kind != "full":
        method["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, **(lora or {})}
    if kind == "qlora":
        method["quantization"] = {"compute_dtype": "float32", **(quant or {})}
    return Recipe.model_validate(
        {
            "name": "t",
            "task": "cpt",
            "seed": seed,
            "model": {"name_or_path": str(model_path), "mirrors": [], "dtype": "float32", **model_kw},
            "method": method,
            "data": {"sources": [{"path": "unused.jsonl"}]},
            "training": {"global_batch_size": 1, "duration": "1 steps"},
        }
    )
