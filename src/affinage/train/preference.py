"""Preference training (``task: dpo`` / ``task: kto``) on TRL's ``DPOTrainer`` / ``KTOTrainer``.

No loop of our own: affinage gives TRL what it does not know — the prepared, already tokenized
pairs (``affinage.data.preference``; ``_prepare_dataset`` is overridden so TRL does not tokenize
again), the recipe's batch/duration/checkpoint arguments (``trainer._training_arguments``), the
starting point (an SFT run, merged or stacked), the reference policy, and the run directory's
callbacks (complete-or-ignored checkpoints, STOP file, metrics.jsonl).

Reference policies:

- ``adapter_disabled``: LoRA/QLoRA; TRL runs the reference with the adapter switched off (the base,
  or with ``start: stacked`` a frozen "ref" copy of the SFT adapter). No second model.
- ``frozen_copy``: full fine-tuning; a second, frozen model in memory.
- ``precomputed``: the reference log-probs of every pair are computed once before training and
  saved in ``<run>/reference/``; a resumed or requeued job reads them instead of recomputing.
- ``none``: reference-free: zero reference log-probs (``sigmoid``: reference-free DPO;
  ``sigmoid_norm``: SimPO without its margin).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from affinage.errors import UserError
from affinage.paths import expand
from affinage.recipe.schema import Recipe
from affinage.run import RunDir, atomic_write_json

START_DIR = "start"
REFERENCE_DIR = "reference"


class PreferenceStartError(UserError):
    """``preference.from_run`` does not point at a usable SFT run."""


# ================================================================================ starting point
def start_model_dir(run: RunDir) -> Path:
    return run.root / START_DIR


def resolve_start(recipe: Recipe, run: RunDir, *, is_main: bool = True) -> tuple[Recipe, Path | None]:
    """(recipe whose ``model`` is the policy's starting weights, SFT adapter to stack or None).

    ``start: merged`` merges the SFT adapter into its base once, into ``<run>/start/`` (with the
    parity check of ``affinage merge``), and trains a new adapter (or all weights) on top; ``stacked``
    returns the SFT adapter folder for the policy to keep training.
    """
    p = recipe.preference
    if p is None or p.from_run is None:
        return recipe, None
    src = expand(p.from_run)
    final = src / "final"
    if not final.is_dir():
        raise PreferenceStartError(
            f"preference.from_run {p.from_run!r}: {final} does not exist — train the SFT stage first "
            f"(affinage train {src / 'recipe.yaml'}) or fix the path (relative to the current directory {Path.cwd()})"
        )
    if not (final / "adapter_config.json").is_file():
        if p.start == "stacked":
            raise PreferenceStartError(f"preference.start: stacked, but {final} is a full model, not an adapter: use start: merged")
        return recipe.model_copy(update={"model": recipe.model.model_copy(update={"name_or_path": str(final.resolve()), "init": "pretrained"})}), None
    if p.start == "stacked":
        return recipe, final.resolve()
    start = start_model_dir(run)
    if is_main and not (start / "config.json").is_file():
        from affinage.model.merge import merge_adapter
        from affinage.recipe.loader import load_recipe

        sft = load_recipe(src / "recipe.yaml") if (src / "recipe.yaml").is_file() else recipe
        tmp = run.root / (START_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        report = merge_adapter(final, sft, tmp, dtype="float32" if recipe.model.dtype in ("auto", "float32") else recipe.model.dtype)
        atomic_write_json(tmp / "affinage-start.json", {"from_run": str(src.resolve()), "adapter": str(final.resolve()),
                                                        "merge": report.to_dict()})
        os.replace(tmp, start)
    _wait_for(start / "config.json")
    model = recipe.model.model_copy(update={"name_or_path": str(start.resolve()), "init": "pretrained"})
    return recipe.model_copy(update={"model": model}), None


def _wait_for(path: Path, timeout: float = 3600) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise PreferenceStartError(f"timed out waiting for {path} (written by rank 0)")
        time.sleep(0.5)


def load_policy(recipe: Recipe, stack: Path | None):
    """(model, peft_config): the model to train and, for a new LoRA adapter, the config TRL applies.

    A new adapter goes through TRL's ``peft_config`` so that TRL's reference is the model with the
    adapter disabled (handing TRL a ready ``PeftModel`` makes it copy the adapter as a "ref" adapter,
    which is what ``start: stacked`` wants). QLoRA keeps ``load_model``'s k-bit preparation.
    """
    from affinage.model.load import load_model, lora_config

    full = recipe.model_copy(update={"method": recipe.method.model_copy(update={"kind": "full", "lora": None})})
    if stack is not None:
        import torch
        from peft import PeftModel

        torch.manual_seed(recipe.seed)
        return PeftModel.from_pretrained(load_model(full), str(stack), is_trainable=True), None
    if recipe.method.kind == "lora":
        return load_model(full), lora_config(recipe.method.lora)
    return load_model(recipe), None


def load_reference(recipe: Recipe, stack: Path | None):
    """A frozen copy of the starting policy (``reference: frozen_copy``)."""
    from affinage.model.load import load_model

    full = recipe.model_copy(update={"method": recipe.method.model_copy(update={"kind": "full", "lora": None, "quantization": None})})
    ref = load_model(full)
    ref.eval()
    for prm in ref.parameters():
        prm.requires_grad_(False)
    return ref


# ============================================================================= TRL trainers
def _ref_cache_key(trainer, dataset, name: str) -> str:
    h = hashlib.sha256()
    h.update(str(trainer._affinage_data_key).encode())
    h.update(name.encode())
    h.update(str(len(dataset)).encode())
    h.update(str(trainer._precompute_model_hash).encode())
    return h.hexdigest()[:24]


def _precompute(trainer, dataset, name: str, batch_size: int, keys: tuple[str, ...]):
    """Reference log-probs of ``dataset`` (TRL's ``compute_ref_log_probs`` per batch), cached in the run dir."""
    from datasets import Dataset, concatenate_datasets
    from torch.utils.data import DataLoader
    import torch

    if trainer._affinage_reference == "none":
        cols = {k: [0.0] * len(dataset) for k in keys}
        return concatenate_datasets([dataset, Dataset.from_dict(cols)], axis=1)
    folder = trainer._affinage_run.root / REFERENCE_DIR
    path = folder / f"{name}-{_ref_cache_key(trainer, dataset, name)}.npz"
    if path.is_file():
        arrays = np.load(path)
        trainer._affinage_reference_events.append({"split": name, "cache": str(path), "hit": True})
    else:
        loader = trainer.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False))
        model = trainer.ref_model or trainer.model
        parts: list[list] = [[] for _ in keys]
        t0 = time.time()
        for batch in loader:
            out = trainer.compute_ref_log_probs(model, batch)
            out = out if isinstance(out, tuple) else (out,)
            out = trainer.accelerator.gather_for_metrics(out)
            for acc, x in zip(parts, out):
                acc.append(x.float().cpu())
        arrays = {k: torch.cat(v).numpy() for k, v in zip(keys, parts)}
        if trainer.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        trainer.accelerator.wait_for_everyone()
        trainer._affinage_reference_events.append({"split": name, "cache": str(path), "hit": False,
                                                   "seconds": round(time.time() - t0, 2)})
    cols = {k: [float(x) for x in arrays[k][: len(dataset)]] for k in keys}
    return concatenate_datasets([dataset, Dataset.from_dict(cols)], axis=1)


def _kl_rotation(dataset, batch_size: int):
    """KTO's mismatched completions, exactly as TRL's ``_prepare_dataset`` builds them (rotate by one per batch)."""

    def add(examples):
        examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
        return examples

    return dataset.map(add, batched=True, batch_size=batch_size)


class _NoTrlModelCard:
    """TRL's trainers write a model card README.md into output_dir (RUN_DIR/checkpoints) at every save:
    a file there that is not a checkpoint makes the run directory check refuse the resume (a requeued
    job failed on it). affinage writes its own model card into final/."""

    def create_model_card(self, *args, **kwargs) -> None:
        return None


def trainer_classes(task: str):
    """(TRL trainer subclass fed by affinage's cache, its config class) for ``task``."""
    if task == "dpo":
        from trl import DPOConfig, DPOTrainer

        class AffinageDPOTrainer(_NoTrlModelCard, DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # already tokenized by affinage prepare (prompt_ids/chosen_ids/rejected_ids)

            def _precompute_ref_logps(self, dataset, name, batch_size):
                return _precompute(self, dataset, name, batch_size, ("ref_chosen_logps", "ref_rejected_logps"))

        return AffinageDPOTrainer, DPOConfig
    from trl import KTOConfig, KTOTrainer

    class AffinageKTOTrainer(_NoTrlModelCard, KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if self.calculate_KL:
                dataset = _kl_rotation(dataset, args.per_device_train_batch_size)
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            keys = ("ref_logps", "ref_KL_logps") if "KL_completion_ids" in dataset.column_names else ("ref_logps",)
            return _precompute(self, dataset, name, batch_size, keys)

    return AffinageKTOTrainer, KTOConfig


def preference_arguments(recipe: Recipe, reference: str) -> dict:
    """The TRL config keywords affinage sets for a preference recipe (the rest: ``trainer._training_arguments``)."""
    p = recipe.preference
    kw: dict[str, Any] = dict(beta=p.beta, max_length=recipe.data.max_length,
                              precompute_ref_log_probs=reference in ("precomputed", "none"),
                              disable_dropout=True, dataset_num_proc=None)
    if recipe.task == "dpo":
        kw.update(loss_type=p.losses, loss_weights=p.loss_weights, label_smoothing=p.label_smoothing,
                  truncation_mode="keep_start")  # pairs are already within max_length: TRL's cut never applies
    else:
        kw.update(loss_type=p.losses[0], desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight)
    return kw


# ====================================================================================== train
def train_preference(recipe: Recipe, run: RunDir, *, resume: bool = True, world_size: int | None = None,
                     callbacks: Sequence[Any] = ()):
    """Train a dpo/kto recipe into ``run``; same run directory, checkpoints, resume and stop as SFT."""
    from transformers.trainer_callback import ProgressCallback

    from affinage.data.errors import DataError
    from affinage.data.prepare import prepare
    from affinage.model.load import load_tokenizer
    from affinage.train import checkpoint as ckpt
    from affinage.train.callbacks import CompleteCheckpointCallback, MetricsFileCallback, ProgressBarCallback, StopRequestCallback
    from affinage.train.trainer import (STOP_FILE, TrainResult, _training_arguments, save_final_and_list_outputs,
                                        steps_for_duration, world_size_from_env)

    start_t = time.time()
    world_size = world_size or world_size_from_env()
    accumulation = recipe.training.gradient_accumulation(world_size)
    is_main = int(os.environ.get("RANK", "0")) == 0
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run.tensorboard))

    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe, tokenizer)
    if is_main:
        atomic_write_json(run.data_stats, {**data.stats, "cache": str(data.path)})
    if len(data.train) == 0:
        raise DataError(f"the preference training set is empty; see {run.data_stats}")
    max_steps = steps_for_duration(recipe, len(data.train), data.train.num_tokens / len(data.train))

    resume_from = None
    if is_main:
        for p in ckpt.remove_incomplete(run.checkpoints):
            print(f"affinage: removed incomplete checkpoint {p} (no {ckpt.MARKER} marker)")
        (run.root / STOP_FILE).unlink(missing_ok=True)
    if resume:
        found = ckpt.newest_complete_checkpoint(run.checkpoints)
        resume_from = str(found) if found else None
    elif is_main and run.checkpoints.exists():
        shutil.rmtree(run.checkpoints)
    if is_main and resume_from is None:
        run.metrics.unlink(missing_ok=True)

    from affinage.distributed.strategies import setup_distributed

    strategy = setup_distributed(recipe, run.root, world_size=world_size, accumulation=accumulation, resume_from=resume_from)
    policy_recipe, stack = resolve_start(recipe, run, is_main=is_main)
    reference = recipe.preference.resolved_reference(recipe.method.kind)
    model, peft_config = load_policy(policy_recipe, stack)
    ref_model = load_reference(policy_recipe, stack) if reference == "frozen_copy" else None
    from affinage.train.kernels import apply_kernels, apply_liger

    kernels = apply_kernels(model, recipe.training.kernels)  # Liger on these instances only (compile: sft/cpt, schema)
    if kernels.liger.on and ref_model is not None:
        apply_liger(ref_model)
    if is_main:
        print(f"affinage: kernels: {kernels.line()}")

    trainer_cls, config_cls = trainer_classes(recipe.task)
    train_ds = data.train.to_dataset()
    eval_ds = None
    if data.heldout is not None and data.heldout.kind == data.train.kind:
        eval_ds = data.heldout.to_dataset()
    # KTO trains on unpaired completions while its held-out split stays pairs: no Trainer eval then
    args = _training_arguments(recipe, run, max_steps, accumulation, has_eval=eval_ds is not None, strategy=strategy,
                               args_class=config_cls, extra={**preference_arguments(recipe, reference), **kernels.training_arguments()})

    cls = strategy.trainer_class(trainer_cls)
    # the cache key and run dir reach the reference-log-prob cache before TRL's __init__ calls it
    cls._affinage_data_key = data.key
    cls._affinage_run = run
    cls._affinage_reference = reference
    cls._affinage_reference_events = []
    stop = StopRequestCallback(run.root / STOP_FILE)
    trainer = cls(
        model=model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[MetricsFileCallback(run), CompleteCheckpointCallback(run.checkpoints, recipe.training.keep_checkpoints),
                   stop, *callbacks],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBarCallback(desc=recipe.name))
    if resume_from and is_main:
        print(f"affinage: resuming from {resume_from}")
    trainer.train(resume_from_checkpoint=resume_from)
    completed = stop.stopped_at is None and trainer.state.global_step >= max_steps

    eval_loss = None
    eval_metrics: dict = {}
    if eval_ds is not None and completed:
        eval_metrics = {k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))}
        eval_loss = eval_metrics.get("eval_loss")
    outputs = save_final_and_list_outputs(trainer, tokenizer, run, is_main, completed)
    losses = [m["loss"] for m in run.read_metrics() if "loss" in m]
    n_train = len(data.train)
    result = TrainResult(
        run_dir=str(run.root), steps=trainer.state.global_step, max_steps=max_steps, completed=completed,
        resumed_from=resume_from, tokens_seen=int(trainer.state.num_input_tokens_seen),
        loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None, eval_loss=eval_loss,
        seconds=round(time.time() - start_t, 2), world_size=world_size, gradient_accumulation=accumulation,
        train_samples=n_train, heldout_samples=len(data.heldout) if data.heldout is not None else 0, outputs=outputs,
        kernels=kernels.as_dict(),
    )
    if is_main:
        slurm = ({"job_id": os.environ["SLURM_JOB_ID"], "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}
                 if "SLURM_JOB_ID" in os.environ else None)
        pref = {"reference": reference, "start": recipe.preference.start if recipe.preference.from_run else None,
                "from_run": recipe.preference.from_run, "start_model": str(policy_recipe.model.name_or_path),
                "stacked_adapter": str(stack) if stack else None, "loss_type": recipe.preference.losses,
                "beta": recipe.preference.beta, "reference_cache": cls._affinage_reference_events, "eval": eval_metrics}
        atomic_write_json(run.summary, {"recipe": recipe.name, "task": recipe.task, "method": recipe.method.kind,
                                        **result.as_dict(), "preference": pref, "slurm": slurm})
    return result
