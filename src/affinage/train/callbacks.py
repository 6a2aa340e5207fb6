"""Trainer callbacks: the few places where affinage hooks into the HF Trainer's loop."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

from affinage.train import checkpoint as ckpt


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CompleteCheckpointCallback(TrainerCallback):
    """Marks a checkpoint complete once every rank has written it, then rotates old ones.

    The Trainer's own rotation (``save_total_limit``) runs before we know the new checkpoint is
    complete, so it is disabled and done here instead.
    """

    def __init__(self, checkpoints: Path, keep: int):
        self.checkpoints = checkpoints
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        from affinage.train.walltime import test_save_sleep

        delay = test_save_sleep()  # test hook (AFFINAGE_TEST_SAVE_SLEEP): a slow file system, before the marker
        if delay:
            time.sleep(delay)
        _barrier()
        if state.is_world_process_zero:
            path = self.checkpoints / f"checkpoint-{state.global_step}"
            if path.is_dir():
                from affinage.run import follow_umask

                follow_umask(path)
                ckpt.mark_complete(path, state.global_step)
                ckpt.rotate(self.checkpoints, self.keep)
        _barrier()
        return control


class MetricsFileCallback(TrainerCallback):
    """Appends every log line to metrics.jsonl (``RunDir.append_metrics``), so curves survive without TensorBoard."""

    def __init__(self, run):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch}
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                row[k] = v
        if "num_input_tokens_seen" in logs:
            row["tokens"] = logs["num_input_tokens_seen"]
        self.run.append_metrics(row)


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the lines logged after ``step`` (a resume from ``step`` logs them again); atomic; returns lines dropped.

    A line cut short by a killed writer is dropped too.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and row.get("step", 0) <= step
        except ValueError:
            keep = False
        if keep:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        from affinage.run import atomic_write_text

        atomic_write_text(path, "".join(l + "\n" for l in kept))
    return dropped


class StopRequestCallback(TrainerCallback):
    """Stops cleanly at the end of the current optimizer step when a stop file appears or SIGTERM came.

    A SLURM job traps its warning signal and creates the file (signals do not cross
    torchrun/accelerate reliably); every rank sees the same shared file, so all ranks agree to save
    a checkpoint at the same step and stop. SIGTERM (scancel, preemption) reaches every process
    and sets :attr:`signal` (:class:`TermSignal`); the ranks agree the same way.
    """

    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        self.stopped_at: int | None = None
        self.reason: str | None = None
        self.signal: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        local = 2 if self.signal else (1 if self.stop_file.exists() else 0)
        requested = local
        if dist.is_available() and dist.is_initialized():
            import torch

            flag = torch.tensor([local])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = int(flag.item())
        if requested and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
            self.reason = "SIGTERM" if requested == 2 else "STOP file"
        return control


class TermSignal:
    """SIGTERM handled like USR1: ask :class:`StopRequestCallback` to checkpoint at the end of the
    step, and leave the process after ``grace_s`` seconds whatever happens (SLURM sends SIGKILL
    ``KillWait`` seconds after SIGTERM; a checkpoint cut short has no COMPLETE marker and is
    ignored). A second SIGTERM exits at once. Installed only in the main thread."""

    def __init__(self, stop: StopRequestCallback, grace_s: float | None = None):
        import os

        self.stop = stop
        self.grace_s = float(os.environ.get("AFFINAGE_TERM_GRACE_S", "600")) if grace_s is None else grace_s
        self.previous = None

    def _handle(self, signum, frame):
        import os
        import sys
        import threading

        if os.getpid() != self.pid or self.stop.signal is not None:
            os._exit(128 + signum)  # a forked worker (tokenization pool) terminated by its parent, or a second SIGTERM
        self.stop.signal = "SIGTERM"
        print(f"affinage: SIGTERM: finishing this optimizer step and writing a checkpoint (at most {self.grace_s:.0f} s)",
              file=sys.stderr, flush=True)
        timer = threading.Timer(self.grace_s, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()

    def __enter__(self):
        import os
        import signal
        import threading

        self.pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


class ProgressBarCallback(TrainerCallback):
    """One progress bar with loss, learning rate and tokens/s in its postfix.

    Replaces the Trainer's default, which prints a Python dict per logged step; a log file and
    metrics.jsonl keep every number, the terminal keeps one readable line.
    """

    def __init__(self, desc: str = "train"):
        self.desc = desc
        self.bar = None
        self.done = 0
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step", dynamic_ncols=True)
            self.done = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.done)
            self.done = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        post = self.postfix
        if "loss" in logs:
            post["loss"] = f"{logs['loss']:.4f}"
        if "eval_loss" in logs:
            post["eval"] = f"{logs['eval_loss']:.4f}"
        if "learning_rate" in logs:
            post["lr"] = f"{logs['learning_rate']:.2e}"
        if post:
            self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
