"""Merge a trained LoRA/DoRA adapter into its base model, and prove the merge is faithful.

The merged folder is what gets evaluated, served or shared, so it must compute what the adapter
model computed. Two rules, both measured: merge into an unquantised copy of the base (merging
into a 4-bit base is off by up to ~1 logit), so a QLoRA run's base is reloaded in float32 or
bfloat16; and check, not assume: the same fixed token batch goes through the adapter model and
through the merged folder *reloaded from disk*, and the largest logit difference is reported
(and must stay under a tolerance: in float32, 1e-4 of the largest logit, at least 1e-4 — rounding
grows with the logits' size: SmolLM2-135M, 30 layers, logits up to ~31, differs by 3.1e-4 after a correct merge).

The folder is written next to ``out_dir`` and moved into place only once the check passed, so a
failed merge never leaves a plausible-looking model behind.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

from affinage.model.errors import MergeParityError, ModelFolderError, ModelNotFoundError
from affinage.model.load import build_random_model, count_parameters, load_config, load_tokenizer, load_tokenizer_folder, resolve_dtype
from affinage.model.resolve import TOKENIZER_FILES, resolve_model_path
from affinage.recipe.schema import ModelSpec, Recipe

#: default largest allowed |logit difference| per merge dtype (float32 is the real check, scaled by the
#: largest |logit| when that exceeds 1; half precision only catches gross errors: rounding the merged
#: weights alone moves logits ~1e-2)
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1, "float16": 5e-2}

REPORT_FILE = "merge_report.json"


@dataclass
class MergeReport:
    """What ``merge_adapter`` did, written as ``merge_report.json`` in the merged folder."""

    adapter_dir: str
    base: str
    out_dir: str
    dtype: str
    max_abs_logit_diff: float
    tolerance: float
    logit_scale: float  # max |logit| of the adapter model on the check batch: the tolerance is relative to it
    check_tokens: int
    base_was_quantized: bool
    total_parameters: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


BaseLike = Union[Recipe, ModelSpec, str, os.PathLike, None]


def _dtype_name(dtype) -> str:
    import torch

    if isinstance(dtype, str):
        return "float32" if dtype == "auto" else dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def _base_spec(base: BaseLike, adapter_dir: Path) -> tuple[ModelSpec, Optional[int], bool]:
    """(model spec, seed for a random-init base, whether training used a 4-bit base)."""
    if isinstance(base, Recipe):
        return base.model, base.seed, base.method.kind == "qlora"
    if isinstance(base, ModelSpec):
        return base, None, False
    if base is None:
        cfg = adapter_dir / "adapter_config.json"
        name = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") if cfg.is_file() else None
        if not name:
            raise ModelFolderError(
                f"{adapter_dir}/adapter_config.json names no base model: pass the recipe or the base model folder"
            )
        base = name
    return ModelSpec(name_or_path=os.fspath(base)), None, False


def _fixed_batch(vocab_size: int, batch: int = 2, length: int = 32):
    """The same token ids on every machine (own generator, global RNG untouched)."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


def _logits(model, input_ids):
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=input_ids.to(device), use_cache=False).logits.float().cpu()


def _adapter_tokenizer(adapter_dir: Path, spec: ModelSpec):
    """The tokenizer saved with the adapter (it may carry a chat template or added tokens), else the base's."""
    if any((adapter_dir / f).is_file() for f in TOKENIZER_FILES):
        return load_tokenizer_folder(adapter_dir, trust_remote_code=spec.trust_remote_code)
    return load_tokenizer(spec)


def merge_adapter(
    adapter_dir: str | os.PathLike,
    base: BaseLike,
    out_dir: str | os.PathLike,
    dtype="float32",
    *,
    tolerance: Optional[float] = None,
) -> MergeReport:
    """Merge the adapter in ``adapter_dir`` into its base and write a standalone model to ``out_dir``.

    ``base`` is the run's :class:`Recipe` (preferred: it knows a random-init base's seed and
    whether the run was QLoRA), a :class:`ModelSpec`, a model folder or id, or None to use the
    adapter's ``base_model_name_or_path``. The base is always loaded unquantised in ``dtype``
    (float32 by default). Raises :class:`MergeParityError` when the reloaded merged model's logits
    differ from the adapter model's by more than ``tolerance``; ``out_dir`` is then left untouched.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from affinage.run import claim_folder, follow_umask, make_dir, write_json

    start = time.monotonic()
    adapter_dir = Path(adapter_dir).resolve()
    out_dir = Path(out_dir).resolve()
    claim_folder(out_dir, (REPORT_FILE,), "merge output")  # an earlier merge may be replaced, nothing else
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelFolderError(
            f"{adapter_dir} has no adapter_config.json: give the adapter folder a LoRA/QLoRA run saved (runs/<name>/final)"
        )
    spec, seed, was_quantized = _base_spec(base, adapter_dir)
    name = _dtype_name(dtype)
    torch_dtype = resolve_dtype(name)

    # 1. the base, never quantised (a QLoRA run's 4-bit base is reloaded in full precision)
    base_path = resolve_model_path(spec.name_or_path, revision=spec.revision, mirrors=spec.mirrors)
    attn = "sdpa" if spec.attn_implementation.startswith("flash") else spec.attn_implementation
    if spec.init == "random":
        if seed is None:
            raise ModelFolderError(
                "the base was built with model.init: random: pass the run's Recipe to merge_adapter so that its seed "
                "rebuilds the same weights"
            )
        config = load_config(spec, base_path)
        model = build_random_model(config, seed, torch_dtype, attn_implementation=attn, trust_remote_code=spec.trust_remote_code)
    else:
        from affinage.model.check import check_model_folder

        check_model_folder(base_path, name=spec.name_or_path, trust_remote_code=spec.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            str(base_path), dtype=torch_dtype, attn_implementation=attn,
            trust_remote_code=spec.trust_remote_code, local_files_only=True,
        )
    tokenizer = _adapter_tokenizer(adapter_dir, spec)

    # 2. the adapter model's logits on a fixed batch, then merge in place
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    batch = _fixed_batch(model.get_input_embeddings().num_embeddings)
    reference = _logits(model, batch)
    logit_scale = float(reference.abs().max())
    if tolerance is not None:
        tol = float(tolerance)
    else:
        tol = DEFAULT_TOLERANCE[name] * (max(1.0, logit_scale) if name == "float32" else 1.0)
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # the merged model is for inference
    in_memory = (_logits(merged, batch) - reference).abs().max().item()

    # 3. write next to out_dir, reload from disk, compare, then move into place
    make_dir(out_dir.parent)
    # not tempfile.mkdtemp: its 0700 mode would hide the merged model from the project group
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    make_dir(staging)
    try:
        merged.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        total = count_parameters(merged)[0]
        del merged, model
        gc.collect()
        reloaded = AutoModelForCausalLM.from_pretrained(
            str(staging), dtype=torch_dtype, attn_implementation=attn,
            trust_remote_code=spec.trust_remote_code, local_files_only=True,
        )
        on_disk = (_logits(reloaded, batch) - reference).abs().max().item()
        del reloaded
        diff = max(in_memory, on_disk)
        if not diff < tol:
            raise MergeParityError(
                f"merged model differs from the adapter model by {diff:.3g} in logits (tolerance {tol:.3g} in {name}, "
                f"max|logit| {logit_scale:.3g}; "
                f"in memory {in_memory:.3g}, reloaded from disk {on_disk:.3g}); nothing was written to {out_dir}. "
                "Merge in float32 (dtype='float32'); if float32 fails too, the saved weights do not reproduce the "
                "adapter model (a peft/transformers bug or a custom layer the merge does not handle).",
                diff, tol,
            )
        report = MergeReport(
            adapter_dir=str(adapter_dir), base=str(base_path), out_dir=str(out_dir), dtype=name,
            max_abs_logit_diff=diff, tolerance=tol, logit_scale=logit_scale, check_tokens=int(batch.numel()), base_was_quantized=was_quantized,
            total_parameters=int(total), seconds=round(time.monotonic() - start, 3),
        )
        write_json(staging / REPORT_FILE, report.to_dict())
        follow_umask(staging)
        claim_folder(out_dir, (REPORT_FILE,), "merge output")  # checked again: it may have appeared meanwhile
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return report


def merge_run(run_dir: Path, out_dir: str | None = None):
    """`affinage merge RUN_DIR`: a finished LoRA/QLoRA run's adapter merged into its base model."""
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
