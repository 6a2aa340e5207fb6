"""`affinage merge RUN_DIR`: a finished LoRA/QLoRA run's adapter merged into its base model."""

from __future__ import annotations

from pathlib import Path


def merge_run(run_dir: Path, out_dir: str | None = None):
    from affinage.model.errors import ModelNotFoundError
    from affinage.model.merge import merge_adapter
    from affinage.recipe.loader import load_recipe
    from affinage.run import RunDir

    run = RunDir(Path(run_dir).resolve())
    if not run.recipe.exists():
        raise ModelNotFoundError(f"{run.root} is not a run directory (no recipe.yaml): give the folder `affinage train` wrote")
    recipe = load_recipe(run.recipe)
    if recipe.method.kind == "full":
        raise ModelNotFoundError(
            f"{run.root} is a full fine-tune: {run.final} is already a complete model; merge is for lora/qlora runs"
        )
    if not (run.final / "adapter_config.json").exists():
        raise ModelNotFoundError(f"no finished adapter in {run.final}: finish (or resume) the training first")
    return merge_adapter(run.final, recipe, Path(out_dir) if out_dir else run.merged)
