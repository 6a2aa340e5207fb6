"""Walltime decisions (pure functions, fake clocks) and the callback driven by a fake Trainer loop;
one real CPU training run that stops on its own clock before a job end given by SLURM_JOB_END_TIME."""

from __future__ import annotations

import json
import time
from datetime import datetime
from types import SimpleNamespace

import pytest
from transformers import TrainerControl

from affinage.run import RunDir
from affinage.train import walltime as wt


# ---------------------------------------------------------------- end time
def test_parse_end_time_epoch_iso_and_unknowns():
    assert wt.parse_end_time("1764590400") == 1764590400.0
    assert wt.parse_end_time(" 1764590400\n") == 1764590400.0
    local = datetime(2026, 12, 1, 12, 30, 0)
    assert wt.parse_end_time("2026-12-01T12:30:00") == local.timestamp()  # squeue prints local time
    assert wt.parse_end_time("2026-12-01T12:30:00\n2026-12-01T12:30:00\n") == local.timestamp()
    for text in (None, "", "Unknown", "N/A", "NONE", "0", "Unlimited", "soon", "2026-12-01T12:30:00\n2026-12-01T13:00:00"):
        assert wt.parse_end_time(text) is None, text


def test_job_end_time_prefers_env_then_squeue_then_none():
    calls = []

    def squeue(job):
        calls.append(job)
        return "2026-12-01T12:30:00\n"

    assert wt.job_end_time({"SLURM_JOB_END_TIME": "1764590400", "SLURM_JOB_ID": "7"}, squeue) == (1764590400.0, "SLURM_JOB_END_TIME")
    assert calls == []
    end, source = wt.job_end_time({"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "Unknown"}, squeue)
    assert end == datetime(2026, 12, 1, 12, 30).timestamp() and source == "squeue -h -j 7 -o %e" and calls == ["7"]
    end, source = wt.job_end_time({"SLURM_JOB_ID": "7"}, lambda job: None)
    assert end is None and "no clock stop" in source
    end, source = wt.job_end_time({}, squeue)
    assert end is None and "not a SLURM job" in source and calls == ["7"]


# ---------------------------------------------------------------- decisions
def test_save_interval_bounds_lost_work():
    n, why = wt.save_interval(step_s=2.0, save_s=60.0, max_lost_s=30 * 60, save_every=None)
    assert n == 870  # 870 * 2 + 60 = 1800
    assert wt.lost_work_s(n, 2.0, 60.0) == 1800.0 and wt.lost_work_s(n + 1, 2.0, 60.0) > 1800
    assert "870 steps" in why
    n, why = wt.save_interval(2.0, 60.0, 30 * 60, save_every=500)
    assert n == 500 and "upper bound" in why
    n, why = wt.save_interval(2.0, 60.0, 30 * 60, save_every=2000)  # the limit wins over a longer save_every
    assert n == 870
    n, why = wt.save_interval(step_s=100.0, save_s=1790.0, max_lost_s=1800.0, save_every=None)
    assert n == 1 and "save every step" in why


def test_stop_now_leaves_one_step_a_save_and_the_margin():
    end = 10_000.0
    # needed = 5 + 1.25 * 40 + 20 = 75 s
    assert wt.stop_now(end - 76, end, step_s=5, save_s=40, margin_s=20)[0] is False
    stop, why = wt.stop_now(end - 75, end, step_s=5, save_s=40, margin_s=20)
    assert stop and "75 s" in why
    assert wt.stop_now(end + 5, end, 5, 40, 20)[0] is True  # already late: stop at once
    assert wt.stop_now(end - 1, None, 5, 40, 20) == (False, "no end time")


# ---------------------------------------------------------------- callback on a fake loop
class FakeClock:
    def __init__(self, t: float = 1_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def drive(cb: wt.WalltimeCallback, clock: FakeClock, *, max_steps: int, step_s, save_s: float, start_step: int = 0,
          intervals: list | None = None):
    """The Trainer's order: step_end, then (when asked) the save and on_save; returns saved steps."""
    state = SimpleNamespace(global_step=start_step, max_steps=max_steps)
    args = SimpleNamespace()
    control = TrainerControl()
    cb.on_train_begin(args, state, control, model=None)
    saved = []
    while state.global_step < max_steps:
        control = TrainerControl()
        clock.t += step_s(state.global_step) if callable(step_s) else step_s
        state.global_step += 1
        cb.on_step_end(args, state, control)
        if intervals is not None:
            intervals.append(cb.interval)
        if control.should_save:
            clock.t += save_s
            saved.append(state.global_step)
            cb.on_save(args, state, control)
        if control.should_training_stop:
            break
    cb.on_train_end(args, state, control)
    return saved, state.global_step


def test_callback_saves_to_bound_lost_work_and_records_why(tmp_path):
    run = RunDir.create(tmp_path / "run")
    clock = FakeClock()
    cb = wt.WalltimeCallback(run, max_lost_minutes=1.0, save_every=None, exit_margin_s=0, clock=clock, end_time=(None, "test"))
    saved, last = drive(cb, clock, max_steps=100, step_s=2.0, save_s=10.0)
    assert last == 100
    # first interval before any save is known: 60 / 2 = 30 steps; then (60 - 10) / 2 = 25
    assert saved == [30, 55, 80], saved
    timing = json.loads(run.timing.read_text())["sessions"][-1]
    assert timing["step_seconds"] == pytest.approx(2.0) and timing["save_seconds_first"] == pytest.approx(10.0)
    assert timing["save_interval_steps"] == 25 and timing["lost_work_s"] == pytest.approx(60.0)
    assert [d["decision"] for d in timing["decisions"]] == ["save every 30 steps", "save every 25 steps"]
    assert all(d["why"] for d in timing["decisions"])


def test_a_slowing_machine_moves_the_interval_every_step_but_says_so_only_past_10_percent(tmp_path):
    """Step time up 1% a step (a node getting busier): the bound follows at once, the console does not churn."""
    run = RunDir.create(tmp_path / "run")
    clock = FakeClock()
    cb = wt.WalltimeCallback(run, max_lost_minutes=10.0, save_every=None, exit_margin_s=0, clock=clock, end_time=(None, "test"))
    intervals: list = []
    drive(cb, clock, max_steps=120, step_s=lambda i: 2.0 * 1.01 ** i, save_s=1.0, intervals=intervals)
    changes = sum(1 for a, b in zip(intervals, intervals[1:]) if a is not None and b != a)
    said = [int(d["decision"].split()[2]) for d in json.loads(run.timing.read_text())["sessions"][-1]["decisions"]
            if d["decision"].startswith("save every")]
    assert changes >= 40 and len(said) <= changes // 3, (changes, said)  # 1 change in 3 said at most
    assert all(abs(b - a) > 0.1 * a for a, b in zip(said, said[1:])), said
    assert intervals[-1] <= said[-1]  # the interval in force is never longer than the one last said


def test_callback_stops_before_the_end_even_without_a_signal(tmp_path):
    run = RunDir.create(tmp_path / "run")
    clock = FakeClock(0.0)
    end = 300.0  # the job ends at t=300 s
    cb = wt.WalltimeCallback(run, max_lost_minutes=30, save_every=None, exit_margin_s=20, clock=clock, end_time=(end, "test"))
    cb.save_prior = 40.0  # as if measured by a previous session
    cb.prior_source = "previous session"
    saved, last = drive(cb, clock, max_steps=1000, step_s=5.0, save_s=40.0)
    assert saved == [last] and cb.stopped_at == last
    # stopped at the first step end with 5 + 1.25 * 40 + 20 = 75 s or less left: t = 5 * last
    assert end - 5 * last <= 75 < end - 5 * (last - 1)
    assert 5 * last + 40 + 20 <= end  # the save and the exit fit
    assert json.loads(run.requeue_request.read_text())["step"] == last
    session = json.loads(run.timing.read_text())["sessions"][-1]
    assert session["stopped_at"] == last and "job's end" in session["decisions"][-1]["decision"]


def test_callback_appends_a_session_and_keeps_the_slowest_save(tmp_path):
    run = RunDir.create(tmp_path / "run")
    clock = FakeClock()
    first = wt.WalltimeCallback(run, max_lost_minutes=1.0, save_every=None, exit_margin_s=0, clock=clock, end_time=(None, "t"))
    drive(first, clock, max_steps=40, step_s=2.0, save_s=10.0)
    second = wt.WalltimeCallback(run, max_lost_minutes=1.0, save_every=None, exit_margin_s=0, clock=clock, end_time=(None, "t"))
    assert second.save_seconds == pytest.approx(10.0) and second.prior_source == "previous session"
    saved, _ = drive(second, clock, max_steps=80, step_s=2.0, save_s=4.0, start_step=40)
    sessions = wt.read_timing(run)
    assert len(sessions) == 2 and sessions[1]["start_step"] == 40
    assert sessions[1]["save_seconds_used"] == pytest.approx(10.0)  # the slower file system still counts
    assert saved[0] == 65  # (60 - 10) / 2 = 25 steps after the resume
    assert wt.measured(sessions) == {"step_seconds": pytest.approx(2.0), "save_seconds": pytest.approx(10.0)}


def test_save_sleep_hook_reads_seconds(monkeypatch):
    monkeypatch.delenv(wt.SAVE_SLEEP_ENV, raising=False)
    assert wt.test_save_sleep() == 0.0
    monkeypatch.setenv(wt.SAVE_SLEEP_ENV, "1.5")
    assert wt.test_save_sleep() == 1.5
    monkeypatch.setenv(wt.SAVE_SLEEP_ENV, "slow")
    assert wt.test_save_sleep() == 0.0


# ---------------------------------------------------------------- a real run on CPU
def test_real_training_stops_on_its_clock_with_a_complete_checkpoint(tmp_path, tiny_llama_dir, demo_data, monkeypatch):
    from train.test_train_e2e import write_recipe  # noqa: E402 (same folder's helper)

    from affinage.recipe.loader import load_recipe
    from affinage.train import checkpoint as ckpt
    from affinage.train.trainer import train

    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir, demo_data / "histoire.jsonl", task="cpt", kind="full",
                                      steps=100000, extra="  exit_margin_s: 1"))
    run = RunDir.create(recipe.run_dir())
    monkeypatch.setenv(wt.SAVE_SLEEP_ENV, "1")
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time() + 25)))
    started = time.time()
    result = train(recipe, run)
    end = int(__import__("os").environ["SLURM_JOB_END_TIME"])
    assert not result.completed and 0 < result.steps < 100000
    assert time.time() <= end, "the run went past the job's end"
    newest = ckpt.newest_complete_checkpoint(run.checkpoints)
    assert newest is not None and ckpt.checkpoint_step(newest) == result.steps
    session = wt.read_timing(run)[-1]
    assert session["stopped_at"] == result.steps and session["end_source"] == "SLURM_JOB_END_TIME"
    assert session["save_seconds_max"] >= 1.0 and session["step_seconds"] > 0
    assert run.requeue_request.exists()
    print(f"real run: {result.steps} steps in {time.time() - started:.1f} s, step {session['step_seconds']:.3f} s, "
          f"save {session['save_seconds_max']:.2f} s")


def test_callback_times_one_save_early_when_the_job_has_an_end(tmp_path):
    run = RunDir.create(tmp_path / "run")
    clock = FakeClock(0.0)
    cb = wt.WalltimeCallback(run, max_lost_minutes=1.0, save_every=None, exit_margin_s=0, clock=clock, end_time=(10_000.0, "t"))
    saved, _ = drive(cb, clock, max_steps=60, step_s=2.0, save_s=10.0)
    assert saved == [wt.WARMUP_STEPS + 1, wt.WARMUP_STEPS + 26, wt.WARMUP_STEPS + 51]  # then every (60 - 10) / 2 steps
    assert read_decisions(run)[:2] == ["save every 30 steps", "save now"]


def read_decisions(run: RunDir) -> list[str]:
    return [d["decision"] for d in wt.read_timing(run)[-1]["decisions"]]


def test_exit_seconds_requeue_cost_and_eta_from_recorded_sessions():
    t0 = datetime(2026, 12, 1, 11, 0, 0).astimezone().timestamp()
    iso = lambda t: datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")  # noqa: E731
    sessions = [
        {"job_id": "2", "restart_count": 0, "start_step": 0, "end_step": 200, "stopped_at": 200, "max_steps": 500,
         "ended": t0 + 50, "end_time": t0 + 60, "first_step_after_s": 25.0, "save_seconds_max": 4.0,
         "step_seconds": 0.1, "save_interval_steps": 100, "save_seconds_used": 4.0},
        {"job_id": "2", "restart_count": 1, "start_step": 200, "max_steps": 500, "step_seconds": 0.1,
         "save_interval_steps": 100, "save_seconds_used": 4.0},
    ]
    events = [
        {"event": "started", "job_id": "2", "restart_count": 0, "time": iso(t0)},
        {"event": "requeued", "job_id": "2", "restart_count": 0, "time": iso(t0 + 62)},
        {"event": "started", "job_id": "2", "restart_count": 1, "time": iso(t0 + 75)},
    ]
    assert wt.exit_seconds(sessions, events) == [12.0]
    assert wt.requeue_cost_s(sessions[0]) == 25.0 + 4.0 + 10.0
    assert wt.requeue_cost_s(sessions[1]) is None
    # from step 250: 250 steps x (0.1 + 4 / 100) s = 35 s, and ceil(250 / 200) - 1 = 1 more requeue of 39 s
    assert wt.eta_seconds(sessions, 250) == pytest.approx(35.0 + 39.0)
    assert wt.eta_seconds(sessions, 500) == 0.0
    assert wt.eta_seconds([], 10) is None


def test_exit_time_of_a_past_job_raises_the_margin(tmp_path):
    from affinage.slurm.status import append_event, jobs_file, read_events

    run = RunDir.create(tmp_path / "run")
    now = time.time()
    atomic = {"sessions": [{"job_id": "9", "restart_count": 0, "ended": now - 100, "step_seconds": 1.0}]}
    run.timing.write_text(json.dumps(atomic))
    append_event(jobs_file(run.root), "requeued", job_id="9", restart_count=0)  # written now: 100 s after the end
    cb = wt.WalltimeCallback(run, max_lost_minutes=30, save_every=None, exit_margin_s=5, end_time=(None, "t"),
                             events=read_events(run.root))
    assert cb.exits and 99 <= cb.exits[0] <= 102
    assert cb.margin_s == pytest.approx(wt.SAVE_SAFETY * cb.exits[0])
