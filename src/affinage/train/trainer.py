"""Glue from a resolved recipe to the HF Trainer: no training loop of our own.

affinage owns what the Trainer does not know: the recipe's global batch (turned into gradient
accumulation for the actual world size), durations with units, loss on assistant tokens only
(labels from ``affinage.data``), complete-or-ignored checkpoints, stop requests, and the run
directory's metrics and summary.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from affinage.recipe.schema import Recipe
from affinage.run import RunDir, atomic_write_json
from affinage.hardware import use_bf16

STOP_FILE = "STOP"


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def steps_for_duration(recipe: Recipe, n_samples: int, mean_tokens: float) -> int:
    """Optimizer steps for the recipe's duration, given the training set actually built."""
    d = recipe.training.duration
    gbs = recipe.training.global_batch_size
    if d.unit == "steps":
        return int(d.value)
    if d.unit == "epochs":
        return max(1, math.ceil(d.value * n_samples / gbs))
    return max(1, math.ceil(d.value / max(1.0, mean_tokens * gbs)))


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    max_steps: int
    completed: bool
    resumed_from: str | None
    tokens_seen: int
    loss_first: float | None
    loss_last: float | None
    eval_loss: float | None
    seconds: float
    world_size: int
    gradient_accumulation: int
    train_samples: int
    heldout_samples: int
    outputs: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _training_arguments(recipe: Recipe, run: RunDir, max_steps: int, accumulation: int, has_eval: bool, strategy=None,
                        args_class=None, extra: dict | None = None):
    """``TrainingArguments`` from the recipe; ``strategy`` (``affinage.distributed.strategies.DistributedSetup``)
    adds the DeepSpeed/FSDP2 keywords of ``distributed.strategy``. ``args_class``/``extra``: a TRL config
    class (``DPOConfig``, ``KTOConfig``) and its own keywords, for ``affinage.train.preference``."""
    from transformers import TrainingArguments

    t = recipe.training
    on_gpu = torch.cuda.is_available()
    bf16 = use_bf16(recipe.model.dtype, on_gpu)
    report = [r for r in t.report_to if r != "none"] or "none"
    sched_kwargs: dict = {}
    scheduler = t.lr_scheduler
    if scheduler == "wsd":
        scheduler = "warmup_stable_decay"
        sched_kwargs = {"num_decay_steps": max(1, max_steps // 10)}
    kwargs = dict(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=sched_kwargs,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        save_total_limit=None,  # rotation happens after the COMPLETE marker (callbacks.py)
        eval_strategy="steps" if (has_eval and t.eval_every) else "no",
        eval_steps=t.eval_every,
        eval_on_start=has_eval and t.eval_on_start,  # the base model's held-out loss, logged at step 0
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=bf16,
        use_cpu=not on_gpu,
        report_to=report,
        run_name=recipe.name,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if recipe.method.kind == "full" else None,
        disable_tqdm=False,
    )
    if strategy is not None:
        kwargs.update(strategy.training_arguments())  # deepspeed=<dict filled from the recipe> / fsdp_config=...
    return (args_class or TrainingArguments)(**kwargs, **(extra or {}))


def train(
    recipe: Recipe,
    run: RunDir,
    *,
    resume: bool = True,
    world_size: int | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train ``recipe`` into ``run``; resume from the newest complete checkpoint when there is one.

    ``callbacks`` are extra ``TrainerCallback`` objects (tests, integrations).
    """
    if recipe.task in ("dpo", "kto"):
        raise ValueError(f"task {recipe.task} trains with affinage.train.tasks.train (TRL's preference trainers), not this SFT/CPT glue")
    from transformers.trainer_callback import ProgressCallback

    from affinage.data.collator import PackedCollator, PackedDataset
    from affinage.data.prepare import prepare
    from affinage.data.errors import DataError
    from affinage.model.load import load_model, load_tokenizer
    from affinage.train import checkpoint as ckpt
    from affinage.train.attention import use_varlen_attention
    from affinage.train.loss import AffinageTrainer
    from affinage.train.callbacks import (
        CompleteCheckpointCallback,
        MetricsFileCallback,
        ProgressBarCallback,
        StopRequestCallback,
    )

    start = time.time()
    world_size = world_size or world_size_from_env()
    accumulation = recipe.training.gradient_accumulation(world_size)
    is_main = int(os.environ.get("RANK", "0")) == 0

    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run.tensorboard))
    if "wandb" in recipe.training.report_to:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(run.root / "logs"))

    tokenizer = load_tokenizer(recipe.model)
    data = prepare(recipe, tokenizer)  # the prepared-data cache: a hit, or built once (other ranks wait)
    if is_main:
        atomic_write_json(run.data_stats, {**data.stats, "cache": str(data.path)})
    if len(data.train) == 0:
        t = data.stats.get("totals", {}).get("train", {})
        raise DataError(
            f"the training set is empty after reading and filtering ({t.get('truncated', 0)} samples truncated to "
            f"data.max_length {recipe.data.max_length}, {t.get('dropped_no_loss', 0)} left without any assistant token): "
            f"raise data.max_length or check the sources; details in {run.data_stats}"
        )

    mean_tokens = data.train.num_tokens / len(data.train)
    max_steps = steps_for_duration(recipe, len(data.train), mean_tokens)

    resume_from = None
    if is_main:
        stale = ckpt.remove_incomplete(run.checkpoints)
        for p in stale:
            print(f"affinage: removed incomplete checkpoint {p} (no {ckpt.MARKER} marker)")
        (run.root / STOP_FILE).unlink(missing_ok=True)
    if resume:
        found = ckpt.newest_complete_checkpoint(run.checkpoints)
        resume_from = str(found) if found else None
    elif is_main and run.checkpoints.exists():
        shutil.rmtree(run.checkpoints)
    if is_main and resume_from is None:
        run.metrics.unlink(missing_ok=True)

    # ---- distributed strategy hook (affinage.distributed, owner: dist) ------------------------------------
    # Before the model loads: process group, ZeRO-3 load-time partitioning, FSDP2 rank-0 loading,
    # DeepSpeed universal conversion when resuming on another world size.
    from affinage.distributed.strategies import setup_distributed

    strategy = setup_distributed(recipe, run.root, world_size=world_size, accumulation=accumulation, resume_from=resume_from)
    # ------------------------------------------------------------------------------------------------
    model = load_model(recipe)
    use_varlen_attention(model, recipe.data.max_length)
    args = _training_arguments(recipe, run, max_steps, accumulation, has_eval=data.heldout is not None, strategy=strategy)
    stop = StopRequestCallback(run.root / STOP_FILE)
    trainer = strategy.trainer_class(AffinageTrainer)(  # strategy hook: FSDP2 on CPU, gathered save, runtime report
        model=model,
        args=args,
        train_dataset=PackedDataset(data.train),
        eval_dataset=PackedDataset(data.heldout) if data.heldout is not None else None,
        data_collator=PackedCollator(tokenizer.pad_token_id, task=recipe.task),
        processing_class=tokenizer,
        loss_spec=recipe.training.loss,
        callbacks=[
            MetricsFileCallback(run.metrics),
            CompleteCheckpointCallback(run.checkpoints, recipe.training.keep_checkpoints),
            stop,
            *callbacks,
        ],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBarCallback(desc=recipe.name))
    if resume_from and is_main:
        print(f"affinage: resuming from {resume_from}")
    trainer.train(resume_from_checkpoint=resume_from)
    completed = stop.stopped_at is None and trainer.state.global_step >= max_steps

    eval_loss = None
    if data.heldout is not None and completed:
        eval_loss = float(trainer.evaluate()["eval_loss"])

    outputs: dict[str, str] = {"run_dir": str(run.root), "checkpoints": str(run.checkpoints)}
    if completed:
        _save_final(trainer, tokenizer, run, is_main)
        outputs["final"] = str(run.final)
    outputs["metrics"] = str(run.metrics)
    outputs["tensorboard"] = str(run.tensorboard)

    losses = [m["loss"] for m in run.read_metrics() if "loss" in m]
    result = TrainResult(
        run_dir=str(run.root),
        steps=trainer.state.global_step,
        max_steps=max_steps,
        completed=completed,
        resumed_from=resume_from,
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        eval_loss=eval_loss,
        seconds=round(time.time() - start, 2),
        world_size=world_size,
        gradient_accumulation=accumulation,
        train_samples=data.stats["totals"]["train"]["samples"],
        heldout_samples=data.stats["totals"]["heldout"]["samples"],
        outputs=outputs,
    )
    if is_main:
        slurm = {"job_id": os.environ["SLURM_JOB_ID"], "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))} if "SLURM_JOB_ID" in os.environ else None
        atomic_write_json(run.summary, {"recipe": recipe.name, "task": recipe.task, "method": recipe.method.kind, **result.as_dict(), "slurm": slurm})
    return result


def _save_final(trainer, tokenizer, run: RunDir, is_main: bool) -> None:
    """Save into a temporary folder and rename: ``final/`` is never half-written."""
    tmp = run.root / "final.tmp"
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))
    if is_main:
        tokenizer.save_pretrained(str(tmp))
        if run.final.exists():
            shutil.rmtree(run.final)
        os.replace(tmp, run.final)
