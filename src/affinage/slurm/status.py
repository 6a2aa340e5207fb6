"""What happened to a run's jobs: ``RUN_DIR/slurm/jobs.jsonl`` joined with ``scontrol show job``.

``jobs.jsonl`` is append-only: ``affinage submit`` writes one ``submitted`` line per stage (job id,
dependency, run directories), and the batch script writes ``started``, ``requeued``, ``terminated``
(SIGTERM: the trainer checkpointed and exited 4) and ``ended``
lines with ``SLURM_RESTART_COUNT``. The ``submitted`` line of a job of a chained SFT run (``--pipeline
prepare,sft,dpo``) is copied into the DPO run's file with ``recorded_in``: the SFT run directory,
whose file has that job's own lines. It outlives SLURM's memory of finished jobs (``MinJobAge``;
``sacct`` needs a database that small clusters lack), so :func:`run_status` falls back to it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from affinage.run import EXIT_SIGTERM, EXIT_STOPPED, RunDir, append_line

# States after which a job never runs again (a requeued job goes back to PENDING instead).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)
_FIELD = re.compile(r"(?:^|\s)(JobId|ArrayJobId|ArrayTaskId|JobState|Reason|Restarts|ExitCode)=(\S*)")


def jobs_file(run_dir: str | os.PathLike) -> Path:
    from affinage.run import RunDir

    return RunDir(Path(run_dir)).jobs


def append_event(path: Path, event: str, **fields) -> None:
    """Append one JSON line; a single short write, so concurrent writers do not interleave lines."""
    row = {"event": event, **fields, "time": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}
    append_line(path, json.dumps(row, ensure_ascii=False))


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    """Every event of a run, oldest first; a line cut short by a killed writer is skipped."""
    from affinage.run import read_jsonl

    return read_jsonl(jobs_file(run_dir))[0]


# ------------------------------------------------------------------------------------ scontrol
@dataclass(frozen=True)
class JobRecord:
    """One job, or one array task, as ``scontrol show job`` sees it now."""

    job_id: str
    array_job_id: Optional[str]
    array_task: Optional[str]  # "3", or "0-4" for tasks still pending together
    state: str
    reason: str
    restarts: int
    exit_code: str

    @property
    def label(self) -> str:
        return f"{self.array_job_id}_{self.array_task}" if self.array_task is not None else self.job_id


def job_records(job_id: str, env: Optional[Mapping[str, str]] = None) -> list[JobRecord]:
    """All records of a job (every task of an array); empty when SLURM no longer knows the job."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, env=dict(env or os.environ)
    )
    if proc.returncode != 0:
        return []
    records = []
    for line in proc.stdout.splitlines():  # a newline inside a WorkDir splits a record: keep JobId lines
        fields = dict(_FIELD.findall(line))
        if "JobId" not in fields:
            continue
        task = fields.get("ArrayTaskId")
        records.append(
            JobRecord(
                job_id=fields["JobId"],
                array_job_id=fields.get("ArrayJobId") if task is not None else None,
                array_task=task,
                state=fields.get("JobState", "UNKNOWN"),
                reason=fields.get("Reason", ""),
                restarts=int(fields.get("Restarts", "0") or 0),
                exit_code=fields.get("ExitCode", ""),
            )
        )
    return records


class JobFailed(RuntimeError):
    """A job reached a final state other than the one waited for."""


def wait_for_job(
    job_id: str,
    states: Sequence[str] = ("COMPLETED",),
    timeout: float = 120.0,
    env: Optional[Mapping[str, str]] = None,
    poll: float = 0.2,
) -> list[JobRecord]:
    """Poll ``scontrol show job`` until every record of ``job_id`` is in ``states``; return them.

    Raises :class:`JobFailed` as soon as a record reaches another final state, and
    :class:`TimeoutError` (with the last states seen) after ``timeout`` seconds. Requeues pass
    through PENDING and are waited through. To stop a training job early in a test, send its
    time-limit warning at once: ``scancel --batch --signal=USR1 JOBID``.
    """
    wanted = set(states)
    deadline = time.monotonic() + timeout
    records: list[JobRecord] = []
    while time.monotonic() < deadline:
        records = job_records(job_id, env)
        if records and all(r.state in wanted for r in records):
            return records
        failed = [r for r in records if r.state in FINAL_STATES and r.state not in wanted]
        if failed:
            raise JobFailed(", ".join(f"job {r.label} ended {r.state} (exit {r.exit_code}, {r.reason})" for r in failed))
        time.sleep(poll)
    seen = ", ".join(f"{r.label}: {r.state}" for r in records) or "unknown to SLURM"
    raise TimeoutError(f"job {job_id} not {'/'.join(states)} after {timeout:.0f} s ({seen})")


def active_jobs(run_dir: str | os.PathLike, env: Optional[Mapping[str, str]] = None) -> list[JobRecord]:
    """Jobs of this run that are still queued or running (a second submission would clash)."""
    active = []
    for event in read_events(run_dir):
        if event.get("event") == "submitted":
            active += [r for r in job_records(event["job_id"], env) if r.state not in FINAL_STATES]
    return active


# -------------------------------------------------------------------------------------- status
def _last_metrics(run_dir: Path) -> dict:
    """The last logged step and loss of ``metrics.jsonl`` (read from the end: the file can be long)."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        return {}
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 16384))
        tail = fh.read().decode("utf-8", errors="replace").splitlines()
    found: dict = {}
    for line in reversed(tail):  # the last row may be an end-of-training summary without a loss
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            for key in ("step", "loss"):
                if key in row:
                    found.setdefault(key, row[key])
        if len(found) == 2:
            break
    return found


def _state_from_events(events: Iterable[dict]) -> str:
    """A job's state from its own lines, once SLURM has forgotten it."""
    last = None
    for event in events:
        last = event
    if last is None:
        return "UNKNOWN"
    if last["event"] == "terminated":
        return "TERMINATED (SIGTERM, checkpoint written: submit again to resume)" if last.get("rc") == EXIT_SIGTERM \
            else f"TERMINATED (SIGTERM, exit {last.get('rc')}: resumes from the last complete checkpoint)"
    if last["event"] == "ended":
        rc = last.get("rc")
        if rc == EXIT_STOPPED:
            return "STOPPED (checkpoint written: submit again to resume)"
        return "COMPLETED" if rc == 0 else f"FAILED (exit {rc})"
    return {"started": "RUNNING?", "requeued": "REQUEUED"}.get(last["event"], "UNKNOWN")


def run_status(run_dir: str | os.PathLike, env: Optional[Mapping[str, str]] = None) -> list[dict]:
    """One row per job (per task for arrays): stage, job, state, restarts, and for training stages
    the last logged step and loss of its run directory."""
    from affinage.slurm.profiles import ProfileError, load_profile

    events = read_events(run_dir)
    rows = []
    for sub in (e for e in events if e.get("event") == "submitted"):
        job_env = env
        if job_env is None:
            try:
                job_env = load_profile(sub["profile"]).command_env()
            except (ProfileError, KeyError):
                job_env = os.environ
        records = {r.array_task or "": r for r in job_records(sub["job_id"], job_env)}
        run_dirs = [Path(p) for p in sub.get("run_dirs", [run_dir])]
        labels = sub.get("labels") or [""] * len(run_dirs)
        # a chained SFT job is recorded in its own run's file (submit --pipeline ...,sft,...)
        recorded = read_events(sub["recorded_in"]) if sub.get("recorded_in") else events
        for task, member in enumerate(run_dirs):
            key = str(task) if sub.get("array") else ""
            mine = [
                e
                for e in recorded
                if e.get("event") != "submitted"
                and e.get("stage") == sub["stage"]
                and (e.get("array_job_id") or e.get("job_id")) == sub["job_id"]
                and (e.get("array_task") or "") == key
            ]
            record = records.get(key) or next(
                (r for k, r in records.items() if "-" in k and _in_range(task, k)), None
            )
            metrics = _last_metrics(member) if sub.get("trains", True) else {}
            timing = _timing(member, metrics.get("step")) if sub.get("trains", True) else {}
            rows.append(
                {
                    "stage": sub["stage"],
                    "job": f"{sub['job_id']}_{task}" if sub.get("array") else sub["job_id"],
                    "state": record.state if record else _state_from_events(mine),
                    "reason": record.reason if record and record.reason not in ("None", "") else "",
                    "restarts": max([record.restarts if record else 0] + [int(e.get("restart_count", 0)) for e in mine]),
                    "step": metrics.get("step"),
                    "loss": metrics.get("loss"),
                    **timing,
                    "label": labels[task] if task < len(labels) else "",
                    "run_dir": str(member),
                }
            )
    return rows


def _timing(run_dir: Path, step: Optional[int]) -> dict:
    """Step and save seconds, what each requeue costs, and the ETA, from ``RUN_DIR/timing.json``."""
    from affinage.run import RunDir
    from affinage.train.walltime import eta_seconds, measured, read_timing, requeue_cost_s

    sessions = read_timing(RunDir(run_dir))
    costs = [c for c in (requeue_cost_s(x) for x in sessions) if c is not None]
    seen = measured(sessions)
    return {
        "step_seconds": seen["step_seconds"],
        "save_seconds": seen["save_seconds"],
        "lost_per_requeue_s": max(costs) if costs else None,
        "eta_s": eta_seconds(sessions, step),
    }


def _seconds(value) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    if value < 10:
        return f"{value:.3g}s"
    return f"{value:.0f}s" if value < 120 else (f"{value / 60:.0f}m" if value < 7200 else f"{value / 3600:.1f}h")


def _in_range(task: int, spec: str) -> bool:
    """Whether ``task`` is in an ArrayTaskId spec such as ``0-4`` or ``1,3-5%2``."""
    for part in spec.split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and int(low) <= task <= int(high or low):
            return True
    return False


def format_status(run_dir: str | os.PathLike, rows: list[dict]) -> str:
    if not rows:
        return f"{run_dir}: no jobs recorded (submit with `affinage submit RECIPE --cluster PROFILE`)"
    header = ("STAGE", "JOB", "STATE", "RESTARTS", "STEP", "LOSS", "S/STEP", "SAVE", "LOST/REQUEUE", "ETA", "NOTE")
    table = [header]
    for r in rows:
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "-"
        note = "  ".join(x for x in (r["reason"], r["label"]) if x)
        times = [_seconds(r.get(k)) for k in ("step_seconds", "save_seconds", "lost_per_requeue_s", "eta_s")]
        table.append((r["stage"], r["job"], r["state"], str(r["restarts"]), str(r["step"] if r["step"] is not None else "-"), loss, *times, note))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"run dir {run_dir}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)
