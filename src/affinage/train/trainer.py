"""Glue from a resolved recipe to the HF Trainer: no training loop of our own.

affinage owns what the Trainer does not know: the recipe's global batch (turned into gradient
accumulation for the actual world size), durations with units, loss on assistant tokens only
(labels from ``affinage.data``), complete-or-ignored checkpoints, stop requests, and the run
directory's metrics and summary.

One cohesive thing (over 400 lines): the one ``train()`` of SFT/CPT and the decisions around it
(resume or not, identity, finished runs, signals, final save); callbacks, checkpoints, identity and
walltime live in modules of their own.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from affinage.errors import UserError
from affinage.recipe.schema import Recipe
from affinage.hardware import use_bf16
from affinage.run import EXIT_SIGTERM, EXIT_STOPPED, RunDir, follow_umask, read_jsonl, write_json, write_text
from affinage.scrub import scrub

STOP_FILE = "STOP"  # RunDir.stop_file; the name the sbatch template and people use


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
    steps_this_session: int = 0
    tokens_this_session: int = 0
    already_complete: bool = False  # a rerun of a finished run: nothing trained, nothing rewritten
    stopped_by: str | None = None  # "STOP file", "STOP file before training", "SIGTERM"
    identity: str | None = None
    torn_metrics_lines: int = 0
    notes: list = field(default_factory=list)
    kernels: dict = field(default_factory=dict)  # attention, loss, liger, torch.compile: what ran and why (train.kernels)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def exit_code(self) -> int:
        """0 complete; 3 stopped on request (STOP, USR1) with a checkpoint; 4 stopped by SIGTERM with a checkpoint."""
        if self.completed:
            return 0
        return EXIT_SIGTERM if self.stopped_by == "SIGTERM" else EXIT_STOPPED


class DurationCutError(UserError):
    """The recipe's duration is shorter than the progress already checkpointed."""


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
        run_name=scrub(recipe.name),  # TensorBoard/W&B write the arguments as text
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
    allow_change: Sequence[str] = (),
    recipe_text: str | None = None,
) -> TrainResult:
    """Train ``recipe`` into ``run``; resume from the newest complete checkpoint when there is one.

    A resume is checked against the run's identity (``affinage.train.identity``): a changed
    recipe, model or data is refused unless ``allow_change`` names the keys. A finished run is
    reported as finished, nothing trained, unless its duration was extended. ``recipe_text`` (the
    resolved recipe) is written to ``run.recipe`` once those checks pass. ``callbacks`` are extra
    ``TrainerCallback`` objects (tests, integrations).
    """
    if recipe.task in ("dpo", "kto"):
        raise ValueError(f"task {recipe.task} trains with affinage.train.tasks.train (TRL's preference trainers), not this SFT/CPT glue")
    from transformers.trainer_callback import ProgressCallback

    from affinage.data.collator import PackedCollator, PackedDataset
    from affinage.data.prepare import prepare
    from affinage.data.errors import DataError
    from affinage.model.load import load_model, load_tokenizer
    from affinage.train import checkpoint as ckpt
    from affinage.train import identity as ident
    from affinage.train.attention import use_varlen_attention
    from affinage.train.kernels import apply_kernels
    from affinage.train.loss import AffinageTrainer
    from affinage.train.callbacks import (
        CompleteCheckpointCallback,
        MetricsFileCallback,
        ProgressBarCallback,
        StopRequestCallback,
        TermSignal,
    )

    start = time.time()
    world_size = world_size or world_size_from_env()
    accumulation = recipe.training.gradient_accumulation(world_size)
    is_main = int(os.environ.get("RANK", "0")) == 0
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run.tensorboard))
    if "wandb" in recipe.training.report_to:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(run.logs))

    tokenizer = load_tokenizer(recipe.model)
    from affinage.model.check import check_recipe_model

    check_recipe_model(recipe, tokenizer)  # a broken model folder stops here, before data preparation
    data = prepare(recipe, tokenizer)  # the prepared-data cache: a hit, or built once (other ranks wait)
    if len(data.train) == 0:
        t = data.stats.get("totals", {}).get("train", {})
        raise DataError(
            f"the training set is empty after reading and filtering ({t.get('truncated', 0)} samples truncated to "
            f"data.max_length {recipe.data.max_length}, {t.get('dropped_no_loss', 0)} left without any assistant token): "
            f"raise data.max_length or check the sources; details in {run.data_stats}"
        )

    marker_note = cpt_marker_note(recipe, tokenizer)
    if marker_note and is_main:
        print(f"affinage: note: {marker_note}")
    mean_tokens = data.train.num_tokens / len(data.train)
    max_steps = steps_for_duration(recipe, len(data.train), mean_tokens)

    # ---- what this start continues: nothing, an interrupted run, or a finished one ----------------
    if is_main:
        for p in ckpt.remove_incomplete(run.checkpoints):
            print(f"affinage: removed incomplete checkpoint {p} (no {ckpt.MARKER} marker)")
    found = None
    if resume:  # verified: a corrupt newest checkpoint is reported and the previous one used (train.checkpoint)
        t_verify = time.perf_counter()
        found = ckpt.newest_resumable(run.checkpoints, say=print if is_main else (lambda _m: None), set_aside=is_main)
        if found and is_main:
            print(f"affinage: verified {found.name} in {time.perf_counter() - t_verify:.2f} s")
    resume_from = str(found) if found else None
    done_step = ckpt.checkpoint_step(found) if found else 0
    previous = run.read_summary() if (resume and run.summary.is_file()) else {}
    finished = bool(resume and previous.get("completed") and run.final.is_dir())
    if finished:
        done_step = max(done_step, int(previous.get("steps") or 0))
    current = ident.current_identity(recipe, data.path)
    changes: list[dict] = []
    if resume_from or finished:
        changes = ident.check_resume(run, current, step=done_step, allow=allow_change)
    if done_step > max_steps:
        raise DurationCutError(
            f"{run.root} has trained {done_step} steps, more than training.duration {recipe.training.duration} "
            f"({max_steps} steps): set a duration of at least {done_step} steps, or start a new run (--run-dir NEW_DIR or --fresh)"
        )
    if finished and max_steps <= done_step:
        if is_main:
            print(f"affinage: {run.root} is already complete ({done_step}/{max_steps} steps, {run.final}): "
                  "nothing to train (extend training.duration to train further, or --fresh to start over)")
        return _finished_result(previous, run, current["identity"])
    if finished and resume_from is None:
        raise DurationCutError(
            f"{run.root} is complete at step {done_step} and training.duration now asks for {max_steps} steps, but no "
            "checkpoint was kept to continue from: start a new run (--run-dir NEW_DIR or --fresh), or set save_every"
        )

    if is_main:
        write_json(run.data_stats, {**data.stats, "cache": str(data.path)})
        if recipe_text is None and not run.recipe.is_file():
            from affinage.recipe.loader import dump_resolved

            recipe_text = dump_resolved(recipe)  # called from code (tests, drivers): a run directory always has its recipe
        if recipe_text is not None:
            write_text(run.recipe, recipe_text)
        ident.record(run, current, changes=changes, restart=resume_from is None)
        for c in changes:
            print(scrub(f"affinage: change allowed at step {c['step']}: {c['key']}: {c['from']!r} → {c['to']!r} (recorded in {run.identity})"))
        if resume_from is None and not resume and run.checkpoints.exists():
            shutil.rmtree(run.checkpoints)
        if resume_from is None:
            run.metrics.unlink(missing_ok=True)
    torn = run.repair_metrics() if is_main else 0
    if is_main and resume_from is not None:
        from affinage.train.callbacks import truncate_metrics

        truncate_metrics(run.metrics, ckpt.checkpoint_step(found))  # one line per step across resumes
    if torn:
        print(f"affinage: ignored {torn} torn line(s) at the end of {run.metrics} (a process killed while writing)")
    stop_before = run.stop_file.exists()

    stop = StopRequestCallback(run.stop_file)
    from affinage.train.walltime import WalltimeCallback

    t = recipe.training  # after the checkpoint callback: its on_save ends the save timing
    walltime = WalltimeCallback(run, max_lost_minutes=t.max_lost_minutes, save_every=t.save_every, exit_margin_s=t.exit_margin_s,
                                is_main=is_main, events=read_jsonl(run.jobs)[0])
    # SIGTERM (scancel, preemption) from here on: checkpoint at the end of the step, exit 4. Not earlier:
    # the tokenization pool of prepare() forks workers that must die on their parent's SIGTERM.
    with TermSignal(stop):
        # ---- distributed strategy hook (affinage.distributed, owner: dist) --------------------------------
        # Before the model loads: process group, ZeRO-3 load-time partitioning, FSDP2 rank-0 loading,
        # DeepSpeed universal conversion when resuming on another world size.
        from affinage.distributed.strategies import setup_distributed

        strategy = setup_distributed(recipe, run.root, world_size=world_size, accumulation=accumulation, resume_from=resume_from)
        # --------------------------------------------------------------------------------------------
        model = load_model(recipe)
        attention = use_varlen_attention(model, recipe.data.max_length)
        kernels = apply_kernels(model, recipe.training.kernels)  # Liger on this instance; torch.compile via the arguments
        args = _training_arguments(recipe, run, max_steps, accumulation, has_eval=data.heldout is not None, strategy=strategy,
                                   extra=kernels.training_arguments())
        trainer = strategy.trainer_class(AffinageTrainer)(  # strategy hook: FSDP2 on CPU, gathered save, runtime report
            model=model,
            args=args,
            train_dataset=PackedDataset(data.train),
            eval_dataset=PackedDataset(data.heldout) if data.heldout is not None else None,
            data_collator=PackedCollator(tokenizer.pad_token_id, task=recipe.task),
            processing_class=tokenizer,
            loss_spec=recipe.training.loss,
            callbacks=[
                MetricsFileCallback(run),
                CompleteCheckpointCallback(run.checkpoints, recipe.training.keep_checkpoints),
                stop,
                walltime,
                *callbacks,
            ],
        )
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ProgressBarCallback(desc=recipe.name))
        kernel_report = {"attention": attention, "loss": f"chunked ({trainer.chunked['backend']})" if trainer.chunked else "plain",
                         **kernels.as_dict()}
        if is_main:
            print(f"affinage: kernels: attention {attention}, loss {kernel_report['loss']}; {kernels.line()}")
        tokens_before = _tokens_at(resume_from)
        stop_before = _agreed(stop_before)  # every rank decides the same, whenever the file appeared
        if stop_before or stop.signal is not None:
            why = "SIGTERM" if stop.signal is not None else "STOP file before training"
            if is_main:
                print(f"affinage: {'SIGTERM received' if stop.signal else f'{run.stop_file} exists'} before training started: "
                      f"stopping after loading, nothing trained"
                      + ("" if stop.signal else f" (remove {run.stop_file} and rerun to train)"))
            stop.stopped_at, stop.reason = done_step, why
            trainer.state.global_step = done_step
            trainer.state.num_input_tokens_seen = tokens_before
        elif resume_from and done_step >= max_steps:
            # the Trainer would run one more step from a checkpoint at max_steps (transformers 5): take its weights as they are
            if is_main:
                print(f"affinage: {resume_from} is the last step ({max_steps}): writing final/ from it")
            trainer._load_from_checkpoint(resume_from)
            trainer.state.global_step = done_step
            trainer.state.num_input_tokens_seen = tokens_before
        else:
            if resume_from and is_main:
                print(f"affinage: resuming from {resume_from}")
            try:
                trainer.train(resume_from_checkpoint=resume_from)
            except Exception as e:
                from affinage.errors import DiskFullError, is_disk_full

                if not is_disk_full(e, run.root):
                    raise
                kept = ckpt.newest_complete_checkpoint(run.checkpoints)
                raise DiskFullError(
                    f"no space left on the device of {run.root} while training (step {trainer.state.global_step}): "
                    + (f"the last complete checkpoint, {kept.name}, is intact and a rerun resumes from it" if kept
                       else "no checkpoint was complete yet, so a rerun starts over")
                    + "; a half-written checkpoint is removed at the next start. Free space (a checkpoint takes about "
                    f"{_checkpoint_size(kept)}), then rerun the same command") from None
            if stop.reason == "STOP file":
                if is_main:
                    run.stop_file.unlink(missing_ok=True)  # the request is fulfilled: a rerun resumes
                _barrier()  # no rank may see the old file in a next train() of the same processes
        completed = stop.stopped_at is None and walltime.stopped_at is None and trainer.state.global_step >= max_steps

        eval_loss = None
        if data.heldout is not None and completed:
            eval_loss = float(trainer.evaluate()["eval_loss"])

        outputs = save_final_and_list_outputs(trainer, tokenizer, run, is_main, completed)

        losses = [m["loss"] for m in run.read_metrics() if "loss" in m]
        tokens = int(trainer.state.num_input_tokens_seen)
        result = TrainResult(
            run_dir=str(run.root),
            steps=trainer.state.global_step,
            max_steps=max_steps,
            completed=completed,
            resumed_from=resume_from,
            tokens_seen=tokens,
            loss_first=losses[0] if losses else None,
            loss_last=losses[-1] if losses else None,
            eval_loss=eval_loss,
            seconds=round(time.time() - start, 2),
            world_size=world_size,
            gradient_accumulation=accumulation,
            train_samples=data.stats["totals"]["train"]["samples"],
            heldout_samples=data.stats["totals"]["heldout"]["samples"],
            outputs=outputs,
            steps_this_session=trainer.state.global_step - done_step,
            tokens_this_session=max(0, tokens - tokens_before),
            stopped_by=stop.reason,
            identity=current["identity"],
            torn_metrics_lines=torn,
            notes=[marker_note] if marker_note else [],
            kernels=kernel_report,
        )
        if is_main:
            slurm = {"job_id": os.environ["SLURM_JOB_ID"], "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))} if "SLURM_JOB_ID" in os.environ else None
            write_json(run.summary, {"recipe": recipe.name, "task": recipe.task, "method": recipe.method.kind, **result.as_dict(), "slurm": slurm})
        return result


#: turn markers of chat templates: a tokenizer whose BOS/EOS is one of them (SmolLM2-Instruct:
#: BOS <|im_start|>, EOS <|im_end|>) wraps every CPT document in a chat turn's markers
CHAT_MARKERS = frozenset({"<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<start_of_turn>", "<end_of_turn>", "<|eot|>", "<|end|>", "<|user|>", "<|assistant|>"})


def cpt_marker_note(recipe: Recipe, tokenizer) -> str | None:
    """A note when CPT documents are wrapped in chat markers (the tokenizer's BOS/EOS), else None."""
    if recipe.task != "cpt":
        return None
    found = [f"{name} {tok}" for name, tok in (("BOS", getattr(tokenizer, "bos_token", None)),
                                               ("EOS", getattr(tokenizer, "eos_token", None))) if tok in CHAT_MARKERS]
    if not found:
        return None
    return (f"CPT documents are wrapped in the tokenizer's {' and '.join(found)}, chat-turn markers of this model: "
            "every document trains the model to open/close a chat turn around raw text")


def _agreed(flag: bool) -> bool:
    """``flag`` OR-ed over the ranks (itself without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return flag


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _tokens_at(checkpoint: str | None) -> int:
    """Tokens seen when ``checkpoint`` was written (its trainer_state.json), 0 for a fresh start."""
    if not checkpoint:
        return 0
    import json

    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    return int(state.get("num_input_tokens_seen") or 0)


def _finished_result(previous: dict, run: RunDir, identity: str) -> TrainResult:
    """The result of a rerun of a finished run: its own summary, nothing trained in this session."""
    fields = {k: previous.get(k) for k in TrainResult.__dataclass_fields__ if k in previous}
    fields.update(steps_this_session=0, tokens_this_session=0, already_complete=True, seconds=0.0, stopped_by=None,
                  identity=identity, torn_metrics_lines=0)
    fields.setdefault("outputs", {"run_dir": str(run.root), "final": str(run.final)})
    for k in ("run_dir", "steps", "max_steps", "completed", "resumed_from", "tokens_seen", "loss_first", "loss_last",
              "eval_loss", "world_size", "gradient_accumulation", "train_samples", "heldout_samples"):
        fields.setdefault(k, None)
    return TrainResult(**fields)


def _checkpoint_size(path) -> str:
    from affinage.distributed.memory import human_bytes

    if path is None:
        return "the size of the model and optimizer states"
    return human_bytes(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()))


def save_final_and_list_outputs(trainer, tokenizer, run: RunDir, is_main: bool, completed: bool) -> dict[str, str]:
    """Write ``final/`` when the run completed; the run's outputs for the summary, in the order printed."""
    outputs = {"run_dir": str(run.root), "checkpoints": str(run.checkpoints)}
    if completed:
        _save_final(trainer, tokenizer, run, is_main)
        outputs["final"] = str(run.final)
    outputs["metrics"] = str(run.metrics)
    outputs["tensorboard"] = str(run.tensorboard)
    return outputs


def _save_final(trainer, tokenizer, run: RunDir, is_main: bool) -> None:
    """Save into a temporary folder and rename: ``final/`` is never half-written."""
    tmp = run.final_tmp
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))
    if is_main:
        tokenizer.save_pretrained(str(tmp))
        follow_umask(tmp)
        if run.final.exists():
            shutil.rmtree(run.final)
        os.replace(tmp, run.final)
