"""Fixtures every test package can use: tiny model folders built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from testlib import DEMO_DATA, demo_texts


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random-init Llama with a BPE tokenizer trained on the demo text and a ChatML template."""
    from affinage.data.templates import NAMED_TEMPLATES
    from affinage.model.tiny import save_tiny_model_folder

    folder = tmp_path_factory.mktemp("tiny-llama")
    return save_tiny_model_folder(
        folder, model_type="llama", texts=demo_texts(), vocab_size=1024, seed=0, chat_template=NAMED_TEMPLATES["chatml"]
    )


@pytest.fixture(scope="session")
def demo_data() -> Path:
    return DEMO_DATA


@pytest.fixture(scope="session")
def pretrained_tiny_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama after a short full pre-training on the demo's general French text.

    LoRA adapts a model that already knows something; on a random-init base its updates barely
    move the loss, so adapter tests start from this one (it is what the demo's base stage does).
    """
    from affinage.recipe.loader import load_recipe_dict
    from affinage.run import RunDir
    from affinage.train.trainer import train

    root = tmp_path_factory.mktemp("pretrained")
    recipe = load_recipe_dict({
        "name": "pretrain-fixture", "task": "cpt", "seed": 0,
        "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
        "method": {"kind": "full"},
        "data": {"sources": [{"path": str(DEMO_DATA / "culture_generale.jsonl"), "format": "text"},
                             {"path": str(DEMO_DATA / "histoire.jsonl"), "format": "text"}], "max_length": 256},
        "training": {"global_batch_size": 8, "micro_batch_size": 4, "duration": "60 steps",
                     "learning_rate": 3e-3, "report_to": ["none"]},
        "output": {"dir": str(root / "run")},
    })
    run = RunDir.create(recipe.run_dir())
    train(recipe, run)
    return run.final
