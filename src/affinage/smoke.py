"""`affinage smoke`: the recipe's whole pipeline, on CPU, with a tiny model of the same architecture.

A researcher checks a 7B recipe on a laptop before spending cluster hours: the real tokenizer and
chat template, the real data readers and loss masks, the same method (LoRA/QLoRA/full), the same
Trainer glue and checkpointing — only the model is shrunk (same ``model_type``, a few layers, random
weights) and the run is a few steps long. Only the model's config.json and tokenizer files are
needed, not its weights.
"""

from __future__ import annotations

from pathlib import Path

from affinage.recipe.schema import Recipe


def build_smoke_model(recipe: Recipe, folder: Path) -> Path:
    """Write a tiny random-init model of the recipe's architecture, with the recipe's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from affinage.model.load import load_tokenizer
    from affinage.model.resolve import resolve_model_path
    from affinage.model.tiny import tiny_config

    source = resolve_model_path(recipe.model.name_or_path, revision=recipe.model.revision, mirrors=recipe.model.mirrors)
    config = AutoConfig.from_pretrained(str(source), trust_remote_code=recipe.model.trust_remote_code)
    tokenizer = load_tokenizer(recipe.model)
    small = tiny_config(config, vocab_size=len(tokenizer))
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(small, trust_remote_code=recipe.model.trust_remote_code)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def smoke_recipe(recipe: Recipe, model_folder: Path, steps: int, run_dir: str) -> Recipe:
    """The same recipe, shrunk: tiny model, short sequences, few records, a checkpoint mid-way."""
    d = recipe.model_dump(mode="json")
    d["name"] = f"{recipe.name}-smoke"
    d["model"].update(
        name_or_path=str(model_folder), tokenizer=None, init="pretrained", dtype="float32",
        attn_implementation="sdpa", revision=None, mirrors=[],
    )
    if d["method"].get("quantization"):
        d["method"]["quantization"]["compute_dtype"] = "float32"
    micro = 1
    d["training"].update(
        global_batch_size=2 * micro, micro_batch_size=micro, duration=f"{steps} steps",
        save_every=max(1, steps // 2), keep_checkpoints=1, eval_every=None, report_to=["none"],
        gradient_checkpointing=recipe.training.gradient_checkpointing, warmup_steps=0,
    )
    if d["training"]["optimizer"] == "adamw_torch_fused":
        d["training"]["optimizer"] = "adamw_torch"
    d["data"]["max_length"] = min(recipe.data.max_length, 1024)
    d["data"]["heldout_fraction"] = min(recipe.data.heldout_fraction, 0.1)
    d["data"]["heldout_max"] = 8
    for src in d["data"]["sources"]:
        src["max_records"] = min(src.get("max_records") or 64, 64)
        src["weight"] = 1.0
    d["data"]["cache_dir"] = str(Path(run_dir) / "cache")  # a throw-away run keeps its prepared data to itself
    if d.get("preference") and d["preference"].get("from_run"):  # the tiny model is the start: no SFT run to merge
        d["preference"].update(from_run=None, start="merged")
        if d["preference"].get("max_prompt_length") and d["preference"]["max_prompt_length"] >= d["data"]["max_length"]:
            d["preference"]["max_prompt_length"] = None
    d["output"]["dir"] = run_dir
    return Recipe.model_validate(d)


def run_smoke(recipe: Recipe, steps: int = 4, run_dir: str | None = None):
    from affinage.recipe.loader import write_resolved
    from affinage.run import RunDir
    from affinage.train.tasks import train

    run = RunDir.create(run_dir or recipe.run_dir().rstrip("/") + "-smoke")
    model_folder = build_smoke_model(recipe, run.root / "tiny-model")
    small = smoke_recipe(recipe, model_folder, steps, str(run.root))
    write_resolved(small, run.recipe)
    return train(small, run, resume=False, world_size=1)
