"""Walltime-aware training: measure step and save times, save often enough, stop before the limit.

The sbatch ``--signal=B:USR1@grace`` warning is a static guess: a grace shorter than the real save
time loses the last checkpoint interval, a longer one wastes the end of every job, and a signal
that comes late (SLURM checks limits every ~30 s) or never leaves the job to be killed mid-save.
So the trainer measures what it needs and decides for itself:

* seconds per optimizer step (after ``WARMUP_STEPS``; intervals that held a save, an evaluation
  or a log flush are left out) and seconds per checkpoint save (the first, then the running max);
* one early save when a job has an end time and no save was ever timed (the stop needs its time);
* a save every N steps so that at most ``training.max_lost_minutes`` of work is lost to a crash
  (``training.save_every`` stays an upper bound);
* a stop, with a checkpoint, as soon as one more step plus a save plus the exit margin
  (``training.exit_margin_s``, raised to what past jobs of the run took to exit) would not fit before the job's end (``SLURM_JOB_END_TIME``, else ``squeue -o %e``). The USR1
  warning then only ever makes the stop earlier.

Everything measured and every decision with its reason go to ``RUN_DIR/timing.json``, one entry per
session (a requeued job appends its own). Decisions are pure functions, tested with fake clocks.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from transformers import TrainerCallback

from affinage.run import RunDir, atomic_write_json

WARMUP_STEPS = 2  # first steps compile kernels, fill caches and allocate: not representative
SAVE_SAFETY = 1.25  # a save can be slower than the slowest one seen so far (file system load)
PRIOR_SAVE_BANDWIDTH = 100e6  # bytes/s assumed for the first save before any was measured (pessimistic)
SAVE_SLEEP_ENV = "AFFINAGE_TEST_SAVE_SLEEP"  # test only: seconds every checkpoint save sleeps before its COMPLETE marker


# ----------------------------------------------------------------------------- job end time
_UNKNOWN = {"", "unknown", "n/a", "none", "invalid", "unlimited", "(null)"}


def parse_end_time(text: Optional[str]) -> Optional[float]:
    """A job end time as epoch seconds, from ``SLURM_JOB_END_TIME`` (epoch) or ``squeue -o %e``
    (``YYYY-MM-DDTHH:MM:SS``, local time). ``None`` for anything that is not a time
    (``Unknown``, ``N/A``, empty, several lines that disagree)."""
    if text is None:
        return None
    lines = {line.strip() for line in str(text).splitlines() if line.strip()}
    if len(lines) != 1:
        return None
    value = lines.pop()
    if value.lower() in _UNKNOWN:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        epoch = float(value)
        return epoch if epoch > 0 else None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.timestamp()  # naive: local time, as squeue prints it


def _squeue_end(job_id: str) -> Optional[str]:
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def job_end_time(
    environ: Mapping[str, str] = os.environ, squeue: Callable[[str], Optional[str]] = _squeue_end
) -> tuple[Optional[float], str]:
    """(end time, where it came from); ``(None, why)`` outside SLURM or when SLURM does not say."""
    end = parse_end_time(environ.get("SLURM_JOB_END_TIME"))
    if end is not None:
        return end, "SLURM_JOB_END_TIME"
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None, "not a SLURM job: no clock stop"
    end = parse_end_time(squeue(job))
    if end is not None:
        return end, f"squeue -h -j {job} -o %e"
    return None, f"SLURM did not give job {job} an end time: no clock stop"


# ----------------------------------------------------------------------------- decisions
def save_interval(step_s: float, save_s: float, max_lost_s: float, save_every: Optional[int]) -> tuple[int, str]:
    """Steps between checkpoints so that a crash loses at most ``max_lost_s`` of work.

    A crash just before a save completes loses the interval's steps and the save itself:
    ``n * step_s + save_s <= max_lost_s``.
    """
    budget = max_lost_s - save_s
    n = max(1, math.floor(budget / step_s)) if step_s > 0 else (save_every or 1)
    why = f"{step_s:.3g} s/step, {save_s:.3g} s/save: {n} steps lose at most {lost_work_s(n, step_s, save_s):.3g} s (limit {max_lost_s:.3g} s)"
    if budget < step_s:
        why = f"a save ({save_s:.3g} s) plus one step ({step_s:.3g} s) exceeds the limit {max_lost_s:.3g} s: save every step"
    if save_every is not None and save_every < n:
        return save_every, f"training.save_every {save_every} (an upper bound) is shorter than the {n} steps the limit allows"
    return n, why


def lost_work_s(interval: int, step_s: float, save_s: float) -> float:
    """Worst-case work lost by a crash: a whole interval plus the save that did not finish."""
    return interval * step_s + save_s


def stop_now(now: float, end: Optional[float], step_s: float, save_s: float, margin_s: float) -> tuple[bool, str]:
    """Whether to save and stop after this step: another step, then a save and the exit margin,
    must fit before ``end``."""
    if end is None:
        return False, "no end time"
    needed = step_s + SAVE_SAFETY * save_s + margin_s
    left = end - now
    if left <= needed:
        return True, (
            f"{left:.0f} s to the job's end, one step ({step_s:.3g} s) + save ({save_s:.3g} s x {SAVE_SAFETY}) "
            f"+ exit margin ({margin_s:.3g} s) needs {needed:.0f} s"
        )
    return False, f"{left:.0f} s left, {needed:.0f} s needed"


def estimate_save_seconds(model) -> float:
    """Before any save was measured: the state's bytes (weights, Adam moments of the trainable
    parameters) at a pessimistic bandwidth."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size() + (8 * p.numel() if p.requires_grad else 0)
    return total / PRIOR_SAVE_BANDWIDTH


def process_start() -> Optional[float]:
    """When this process started (epoch seconds, Linux /proc), for the start-up cost of a job."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def test_save_sleep() -> float:
    """Seconds a checkpoint save sleeps (``AFFINAGE_TEST_SAVE_SLEEP``; test only, default 0)."""
    value = os.environ.get(SAVE_SLEEP_ENV, "").strip()
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def read_timing(run: RunDir) -> list[dict]:
    """The sessions recorded in ``RUN_DIR/timing.json`` (oldest first; empty when there is none)."""
    try:
        data = json.loads(run.timing.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return [s for s in data.get("sessions", []) if isinstance(s, dict)] if isinstance(data, dict) else []


def measured(sessions: list[dict]) -> dict:
    """Step and save seconds over all sessions: the step time of the latest session that measured
    one, the largest save seen."""
    steps = [s["step_seconds"] for s in sessions if s.get("step_seconds")]
    saves = [s["save_seconds_max"] for s in sessions if s.get("save_seconds_max")]
    return {"step_seconds": steps[-1] if steps else None, "save_seconds": max(saves) if saves else None}


def exit_seconds(sessions: list[dict], events: list[dict]) -> list[float]:
    """Seconds from each past session's end of training to its job's ``requeued``/``ended`` line in
    ``slurm/jobs.jsonl``: the summary, provenance and process exit that the exit margin must cover."""
    from datetime import datetime

    found = []
    for s in sessions:
        if not s.get("ended") or not s.get("job_id"):
            continue
        for e in events:
            if e.get("event") in ("requeued", "ended") and str(e.get("job_id")) == str(s["job_id"]) and int(e.get("restart_count", -1)) == s.get("restart_count"):
                try:
                    found.append(max(0.0, datetime.fromisoformat(e["time"]).timestamp() - s["ended"]))
                except (KeyError, ValueError, TypeError):
                    pass
                break
    return found


def requeue_cost_s(session: dict) -> Optional[float]:
    """Time of a job that stopped on the clock and trained nothing: start-up, the final save, the
    rest to the job's end (the measured part of what each requeue loses)."""
    if not session.get("stopped_at") or not session.get("end_time") or not session.get("ended"):
        return None
    return (session.get("first_step_after_s") or 0.0) + (session.get("save_seconds_max") or 0.0) + max(0.0, session["end_time"] - session["ended"])


def eta_seconds(sessions: list[dict], step: Optional[int]) -> Optional[float]:
    """Seconds to the end of training from ``step``: steps left at the measured pace (periodic saves
    included), plus one requeue cost per job still needed at the steps a past job managed."""
    if not sessions or step is None:
        return None
    last = sessions[-1]
    step_s, max_steps = measured(sessions)["step_seconds"], last.get("max_steps")
    if not step_s or not max_steps:
        return None
    left = max(0, max_steps - step)
    interval, save_s = last.get("save_interval_steps") or 0, last.get("save_seconds_used") or 0.0
    train_s = left * (step_s + (save_s / interval if interval else 0.0))
    per_job = [s["end_step"] - s["start_step"] for s in sessions if s.get("stopped_at") and s.get("end_step")]
    costs = [c for c in (requeue_cost_s(s) for s in sessions) if c is not None]
    if per_job and costs and left:
        train_s += max(0, math.ceil(left / max(1, max(per_job))) - 1) * max(costs)
    return train_s


# ----------------------------------------------------------------------------- callback
def _agree(flags: list[bool]) -> list[bool]:
    """Every rank takes a flag raised on any rank (saves and stops must happen on all of them)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flags
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if f else 0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class WalltimeCallback(TrainerCallback):
    """Measures step/save seconds, adds saves so little work is lost, and stops before the job's end.

    Place it after the callbacks that finish a checkpoint (its ``on_save`` ends the save timing).
    ``events`` are the run's ``slurm/jobs.jsonl`` lines (past jobs' exit times); ``clock`` and
    ``end_time`` are for tests.
    """

    def __init__(
        self,
        run: RunDir,
        *,
        max_lost_minutes: float,
        save_every: Optional[int],
        exit_margin_s: float,
        clock: Callable[[], float] = time.time,
        end_time: Optional[tuple[Optional[float], str]] = None,
        is_main: bool = True,
        events: Sequence[dict] = (),
    ):
        self.run = run
        self.max_lost_s = max_lost_minutes * 60
        self.save_every = save_every
        self.margin_s = exit_margin_s
        self.clock = clock
        if end_time is None:  # one clock (and one squeue call) per job: every rank takes rank 0's stop (_agree)
            end_time = job_end_time() if is_main else (None, "rank 0 keeps the clock")
        self.end, self.end_source = end_time
        self.is_main = is_main
        self.step_times: list[float] = []
        self.save_times: list[float] = []
        self.last_mark: Optional[float] = None  # end of the last step, or of the save/evaluation after it
        self.steps_seen = 0
        self.last_save_step = 0
        self.interval: Optional[int] = None
        self.announced: Optional[int] = None  # the interval last printed and recorded
        self.stopped_at: Optional[int] = None
        self.probing = False
        self.decisions: list[dict] = []
        self.previous = read_timing(run)
        self.save_prior: Optional[float] = measured(self.previous)["save_seconds"]
        self.prior_source = "previous session" if self.save_prior is not None else None
        self.session: dict = {}
        self.exits = exit_seconds(self.previous, list(events))
        if self.exits:  # a past job took this long to exit after training: keep room for it
            self.margin_s = max(self.margin_s, SAVE_SAFETY * max(self.exits))

    # ---- measurements
    @property
    def step_seconds(self) -> Optional[float]:
        usable = self.step_times[WARMUP_STEPS:] if len(self.step_times) > WARMUP_STEPS else []
        if not usable:
            return None
        return sum(usable) / len(usable)

    @property
    def save_seconds(self) -> Optional[float]:
        seen = list(self.save_times)
        if self.prior_source == "previous session":
            seen.append(self.save_prior)  # this job's file system may be as slow as the last one's
        return max(seen) if seen else self.save_prior

    def _decide(self, step: int, what: str, why: str) -> None:
        self.decisions.append({"step": step, "time": round(self.clock(), 3), "decision": what, "why": why})
        print(f"affinage: walltime: step {step}: {what} ({why})", flush=True)
        self._write()

    def _write(self) -> None:
        if not self.is_main:
            return
        step_s, save_s = self.step_seconds, self.save_seconds
        self.session.update(
            {
                "steps_timed": max(0, len(self.step_times) - WARMUP_STEPS),
                "step_seconds": round(step_s, 6) if step_s else None,
                "step_seconds_max": round(max(self.step_times[WARMUP_STEPS:]), 6) if len(self.step_times) > WARMUP_STEPS else None,
                "save_seconds_first": round(self.save_times[0], 4) if self.save_times else None,
                "save_seconds_max": round(max(self.save_times), 4) if self.save_times else None,
                "saves": [round(s, 4) for s in self.save_times],
                "save_seconds_used": round(save_s, 4) if save_s is not None else None,
                "save_interval_steps": self.interval,
                "lost_work_s": round(lost_work_s(self.interval, step_s, save_s or 0.0), 3) if self.interval and step_s else None,
                "stopped_at": self.stopped_at,
                "decisions": self.decisions,
            }
        )
        atomic_write_json(self.run.timing, {"sessions": [*self.previous, self.session]})

    # ---- hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.is_main:
            self.run.requeue_request.unlink(missing_ok=True)
        if self.save_prior is None and model is not None:
            self.save_prior = estimate_save_seconds(model)
            self.prior_source = f"estimate: state bytes at {PRIOR_SAVE_BANDWIDTH / 1e6:.0f} MB/s"
        self.last_save_step = state.global_step
        self.session = {
            "started": round(self.clock(), 3),
            "start_step": state.global_step,
            "max_steps": state.max_steps,
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "end_time": self.end,
            "end_source": self.end_source,
            "max_lost_minutes": self.max_lost_s / 60,
            "exit_margin_s": self.margin_s,
            "exit_seconds_measured": [round(x, 1) for x in self.exits],
            "save_every": self.save_every,
            "save_prior_s": round(self.save_prior, 4) if self.save_prior is not None else None,
            "save_prior_source": self.prior_source,
        }
        self._write()
        self.last_mark = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        if self.last_mark is not None:
            self.step_times.append(now - self.last_mark)
        self.steps_seen += 1
        if self.steps_seen == 1 and self.is_main:
            started = process_start()
            self.session["first_step_after_s"] = round(now - started, 3) if started else None  # start-up cost of a job
        step = state.global_step
        step_s, save_s = self.step_seconds, self.save_seconds
        want_save = want_stop = False
        why_stop = ""
        if step_s is not None:
            n, why = save_interval(step_s, save_s or 0.0, self.max_lost_s, self.save_every)
            # shorter at once (the bound must hold), longer only past 10% (no churn on noise); said (console and
            # timing.json) only when it moved 10% from what was last said: a slowing machine shrinks it every step
            if self.interval is None or n < self.interval or n > 1.1 * self.interval:
                self.interval = n
                if self.announced is None or abs(n - self.announced) > 0.1 * self.announced:
                    self.announced = n
                    self._decide(step, f"save every {n} steps", why)
            want_save = step - self.last_save_step >= n
            if self.end is not None and not self.save_times and self.prior_source != "previous session":
                want_save = True  # the clock stop needs a real save time: measure one now, once per run
                if not self.probing:
                    self.probing = True
                    self._decide(step, "save now", f"no save measured yet ({self.prior_source}): the first one times the file system")
            if step < state.max_steps:
                want_stop, why_stop = stop_now(now, self.end, step_s, save_s or 0.0, self.margin_s)
        elif self.end is not None and step < state.max_steps:
            # still warming up: judge with the longest step seen so far
            guess = max(self.step_times, default=now - self.session["started"])
            want_stop, why_stop = stop_now(now, self.end, guess, save_s or 0.0, self.margin_s)
        want_save, want_stop = _agree([want_save, want_stop])
        if want_stop and step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = step
            if self.is_main:
                atomic_write_json(self.run.requeue_request, {"step": step, "why": why_stop})
            self._decide(step, "stop and checkpoint before the job's end", why_stop or "another rank's clock")
        elif want_save:
            control.should_save = True
        self.last_mark = self.clock()
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        self.last_mark = self.clock()  # an evaluation is neither a step nor a save

    def on_save(self, args, state, control, **kwargs):
        now = self.clock()
        if self.last_mark is not None:
            self.save_times.append(now - self.last_mark)
        self.last_save_step = state.global_step
        self._write()
        self.last_mark = self.clock()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.session["ended"] = round(self.clock(), 3)
        self.session["end_step"] = state.global_step
        self._write()
