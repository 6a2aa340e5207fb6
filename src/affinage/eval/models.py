"""Which models ``affinage eval`` compares, and how to load them offline.

A **run directory** (it has ``recipe.yaml``) is evaluated as the model it produced: ``merged/``
when ``affinage merge`` wrote one, else ``final/`` — a full model, or a LoRA adapter loaded on the
recipe's base exactly as training built it (a ``model.init: random`` base is rebuilt from its
seed). Its **base** for the before/after comparison is the recipe's model, or ``eval.base``.

A **model folder** (or a Hugging Face id found offline) is evaluated as it is; an adapter folder
is loaded on the base its ``adapter_config.json`` names. A base to compare with is given with
``--base`` (an adapter folder's own base is used by default).

Models are loaded one at a time in evaluation mode, in bfloat16 on a GPU that supports it, else
float32. When the tuned model is an adapter on the very base just evaluated, the base in memory
is reused.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from affinage.errors import UserError
from affinage.recipe.schema import ModelSpec, Recipe
from affinage.paths import expand


@dataclass
class ModelRef:
    """A model to load: a folder, or the recipe's model spec (pretrained or random init), plus an optional adapter."""

    description: str
    spec: ModelSpec
    seed: Optional[int] = None        # for model.init: random
    adapter: Optional[Path] = None    # LoRA adapter folder put on top
    tokenizer_folder: Optional[Path] = None

    def same_base(self, other: "ModelRef") -> bool:
        return self.spec == other.spec and self.seed == other.seed


@dataclass
class Target:
    root: Path                         # run dir, or the model folder
    run: Any = None                    # RunDir when a run directory
    recipe: Optional[Recipe] = None
    tuned: Optional[ModelRef] = None
    base: Optional[ModelRef] = None
    notes: list[str] = field(default_factory=list)


def _folder_spec(path: str) -> ModelSpec:
    return ModelSpec(name_or_path=str(path), dtype="auto")


def _adapter_base_name(adapter: Path) -> str:
    cfg = adapter / "adapter_config.json"
    name = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not name:
        raise UserError(f"{cfg} names no base model (base_model_name_or_path): pass --base MODEL")
    return name


def is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file()


def resolve_target(target: str | os.PathLike, *, base: Optional[str] = None, compare_base: bool = True,
                   spec_base: Optional[str] = None) -> Target:
    """What to evaluate for ``target`` (run dir, model folder or offline HF id) and what to compare it with."""
    from affinage.recipe.loader import load_recipe
    from affinage.run import RunDir

    path = expand(target)
    base = base or spec_base
    if path.is_dir() and is_run_dir(path):
        run = RunDir(path.resolve())
        recipe = load_recipe(run.recipe)
        t = Target(root=run.root, run=run, recipe=recipe)
        tok_folder = run.final if (run.final / "tokenizer_config.json").is_file() else None
        if (run.merged / "config.json").is_file():
            t.tuned = ModelRef(f"fine-tuned ({run.merged.name}/)", _folder_spec(run.merged))
        elif (run.final / "adapter_config.json").is_file():
            t.tuned = ModelRef(f"fine-tuned ({run.final.name}/ adapter on {recipe.model.name_or_path})", recipe.model,
                               seed=recipe.seed if recipe.model.init == "random" else None, adapter=run.final,
                               tokenizer_folder=tok_folder)
        elif (run.final / "config.json").is_file():
            t.tuned = ModelRef(f"fine-tuned ({run.final.name}/)", _folder_spec(run.final))
        else:
            raise UserError(
                f"{run.root} has no trained model yet (no final/ or merged/): finish the training first "
                f"(affinage train {run.recipe} resumes it)"
            )
        if compare_base:
            if base:
                t.base = ModelRef(f"base ({base})", _folder_spec(base))
            else:
                m = recipe.model
                desc = f"base ({m.name_or_path}" + (f", random init seed {recipe.seed})" if m.init == "random" else ")")
                t.base = ModelRef(desc, m, seed=recipe.seed if m.init == "random" else None)
        return t

    from affinage.model.resolve import resolve_model_path

    if path.is_dir() and (path / "adapter_config.json").is_file():
        folder = path.resolve()
    else:
        folder = resolve_model_path(os.fspath(target))
    t = Target(root=folder)
    if (folder / "adapter_config.json").is_file():
        base_name = _adapter_base_name(folder)
        t.tuned = ModelRef(f"model ({folder.name}/ adapter on {base_name})", _folder_spec(base_name), adapter=folder,
                           tokenizer_folder=folder if (folder / "tokenizer_config.json").is_file() else None)
        if compare_base:
            t.base = ModelRef(f"base ({base or base_name})", _folder_spec(base or base_name))
    else:
        t.tuned = ModelRef(f"model ({folder})", _folder_spec(folder))
        if compare_base and base:
            t.base = ModelRef(f"base ({base})", _folder_spec(base))
        elif compare_base:
            t.notes.append("no base model to compare with (pass --base MODEL): only this model is evaluated")
    return t


def eval_dtype(device: str):
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    base_model: Any = None  # the base under an adapter (for reuse)


def load(ref: ModelRef, *, device: str, reuse_base: Any = None) -> Loaded:
    """Load ``ref`` for evaluation (eval mode, on ``device``); ``reuse_base`` is a base already in memory."""
    from transformers import AutoModelForCausalLM

    from affinage.model.load import build_random_model, check_attention, load_config, load_tokenizer, load_tokenizer_folder
    from affinage.model.resolve import resolve_model_path

    spec = ref.spec
    dtype = eval_dtype(device)
    attn = spec.attn_implementation
    try:
        check_attention(attn, dtype)
    except Exception:
        attn = "sdpa"
    if reuse_base is not None:
        model = reuse_base
    else:
        path = resolve_model_path(spec.name_or_path, revision=spec.revision, mirrors=spec.mirrors)
        if spec.init == "random":
            if ref.seed is None:
                raise UserError(f"{ref.description}: a random-init base needs the recipe's seed")
            model = build_random_model(load_config(spec, path), ref.seed, dtype, attn_implementation=attn,
                                       trust_remote_code=spec.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, attn_implementation=attn, trust_remote_code=spec.trust_remote_code,
                local_files_only=True,
            )
        model.to(device)
    base_model = model
    if ref.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(ref.adapter), is_trainable=False)
        model.to(device)
    model.eval()
    if ref.tokenizer_folder is not None:
        tok = load_tokenizer_folder(ref.tokenizer_folder, trust_remote_code=spec.trust_remote_code)
    else:
        tok = load_tokenizer(spec)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return Loaded(model, tok, base_model)


def unload(*_objs) -> None:
    """Release memory once the caller has dropped its references to a model."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def context_length(model, fallback: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
    return int(min(n, fallback)) if n else fallback
