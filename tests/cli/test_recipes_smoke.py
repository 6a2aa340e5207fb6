"""The realistic recipes in recipes/ pass `affinage plan` and `affinage smoke` with the real tokenizers.

The models are staged the way a Jean Zay user finds them: ``$DSDIR/HuggingFace_Models/<org>/<name>``
holding config.json and tokenizer files (no weights: smoke builds a tiny model of the same
architecture), and the data under ``$WORK/data``.
"""

from __future__ import annotations

import json

import pytest
from testlib import REPO, needs_shared, shared_dir

# Qwen2.5-7B-Instruct's published architecture (the shared folder has its tokenizer, not its config).
QWEN25_7B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory, monkeypatch_module=None):
    """$DSDIR and $WORK laid out like Jean Zay's, pointing at ../shared in place (symlinks, no copies)."""
    shared = shared_dir()
    root = tmp_path_factory.mktemp("jz")
    models = root / "dsdir" / "HuggingFace_Models"
    for org_name, folder in (
        ("OpenLLM-France/Lucie-7B-Instruct", "lucie-7b-instruct"),
        ("mistralai/Mistral-7B-v0.3", "mistral-7b-instruct-v0.3"),
    ):
        (models / org_name).parent.mkdir(parents=True, exist_ok=True)
        (models / org_name).symlink_to(shared / "tokenizers" / folder)
    qwen = models / "Qwen" / "Qwen2.5-7B-Instruct"
    qwen.mkdir(parents=True)
    for f in (shared / "tokenizers" / "qwen2.5-instruct").iterdir():
        (qwen / f.name).symlink_to(f)
    (qwen / "config.json").write_text(json.dumps(QWEN25_7B_CONFIG))
    work = root / "work"
    (work / "data").mkdir(parents=True)
    for f in (shared / "data").glob("*.jsonl"):
        (work / "data" / f.name).symlink_to(f)
    return {"DSDIR": str(root / "dsdir"), "WORK": str(work)}


REAL_RECIPES = [
    ("lucie-7b/lora/sft-piaf.yaml", "llama", 6.7e9, 7.5e9),
    ("mistral-7b/qlora/cpt-legal.yaml", "mistral", 7.0e9, 7.5e9),
    ("qwen2.5-7b/lora/sft-piaf.yaml", "qwen2", 7.0e9, 8.0e9),
]


@needs_shared
@pytest.mark.parametrize("rel,model_type,low,high", REAL_RECIPES, ids=[r[0] for r in REAL_RECIPES])
def test_real_recipe_plans_without_weights(rel, model_type, low, high, cluster_env, monkeypatch):
    for k, v in cluster_env.items():
        monkeypatch.setenv(k, v)
    from affinage.plan import make_plan
    from affinage.recipe.loader import load_recipe

    recipe = load_recipe(REPO / "recipes" / rel, world_size=4)
    plan = make_plan(recipe, world_size=4)
    assert plan.model_type == model_type
    assert low < plan.params_total < high
    assert 0 < plan.params_trainable < plan.params_total * 0.05  # LoRA trains a small share
    assert plan.gradient_accumulation * 4 * recipe.training.micro_batch_size == recipe.training.global_batch_size
    assert plan.memory.total < 80 * 2**30, "a 7B LoRA/QLoRA recipe must fit one 80 GB H100"


@needs_shared
@pytest.mark.parametrize("rel", [r[0] for r in REAL_RECIPES])
def test_real_recipe_passes_smoke(rel, cluster_env, monkeypatch, tmp_path):
    for k, v in cluster_env.items():
        monkeypatch.setenv(k, v)
    from affinage.cli import main

    code = main(["smoke", str(REPO / "recipes" / rel), "--steps", "3", "--run-dir", str(tmp_path / "smoke")])
    assert code == 0
    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 3
    assert summary["loss_first"] > 0 and summary["tokens_seen"] > 0
    tiny = json.loads((tmp_path / "smoke" / "tiny-model" / "config.json").read_text())
    assert tiny["model_type"] == REAL_RECIPES[[r[0] for r in REAL_RECIPES].index(rel)][1]
