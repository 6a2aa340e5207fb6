"""`affinage status` reads the trainer's exit codes from jobs.jsonl once SLURM has forgotten the job."""

from __future__ import annotations

from affinage.run import EXIT_SIGTERM, EXIT_STOPPED
from affinage.slurm.status import _state_from_events


def test_terminated_and_stopped_jobs_are_told_apart_from_failures():
    assert _state_from_events([{"event": "started"}, {"event": "terminated", "rc": EXIT_SIGTERM}]).startswith(
        "TERMINATED (SIGTERM, checkpoint written")
    assert _state_from_events([{"event": "ended", "rc": EXIT_STOPPED}]).startswith("STOPPED (checkpoint written")
    assert _state_from_events([{"event": "ended", "rc": 0}]) == "COMPLETED"
    assert _state_from_events([{"event": "ended", "rc": 1}]) == "FAILED (exit 1)"
