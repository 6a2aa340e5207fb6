"""How many requeued jobs and GPU-hours a recipe takes on a cluster, before anything is queued.

The step time comes from a previous run of the same recipe (its ``RUN_DIR/timing.json``, scaled to
the world size asked for) or, when there is none, from the FLOPs estimate (6 × parameters × tokens
for a full fine-tune, 4 × for adapters, whose frozen weights get no weight gradient) at an assumed
fraction of the GPU kind's peak. Each job then loses its start-up, the final save and the exit
margin, as the trainer's own walltime rule does (``affinage.train.walltime``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from affinage.train.walltime import SAVE_SAFETY, lost_work_s, measured, save_interval

ASSUMED_MFU = 0.35  # fraction of peak a well-configured fine-tune reaches (no measurement yet)
ASSUMED_STARTUP_S = 300.0  # module load, imports, model load, resume: until the first step
ASSUMED_SAVE_BANDWIDTH = 1e9  # bytes/s to a parallel file system, when no save was measured


@dataclass
class ChainEstimate:
    steps: int
    step_seconds: float
    step_source: str
    save_seconds: float
    save_source: str
    job_seconds: int
    startup_seconds: float
    world_size: int
    save_interval: int
    save_why: str
    steps_per_job: int
    jobs: int
    lost_per_requeue_s: float  # job time not spent training: start-up, final save, exit margin, the step that did not fit
    lost_work_s: float  # worst case after a crash: one interval plus its save
    wall_seconds: float
    gpu_hours: float
    budget_hours: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits_budget(self) -> Optional[bool]:
        return None if self.budget_hours is None else self.gpu_hours <= self.budget_hours

    def as_dict(self) -> dict:
        return {**asdict(self), "fits_budget": self.fits_budget}


def chain_estimate(
    *,
    steps: int,
    step_seconds: float,
    save_seconds: float,
    job_seconds: int,
    world_size: int,
    max_lost_s: float,
    save_every: Optional[int],
    exit_margin_s: float,
    startup_seconds: float = ASSUMED_STARTUP_S,
    step_source: str = "",
    save_source: str = "",
    budget_hours: Optional[float] = None,
) -> ChainEstimate:
    """The job chain the walltime rule produces: per job, start-up, then intervals of steps and
    saves, then a stop that leaves one step, a save (× safety) and the exit margin."""
    interval, why = save_interval(step_seconds, save_seconds, max_lost_s, save_every)
    training_s = job_seconds - startup_seconds - step_seconds - SAVE_SAFETY * save_seconds - exit_margin_s
    per_step = step_seconds + save_seconds / interval  # periodic saves spread over their steps
    steps_per_job = max(0, math.floor(training_s / per_step))
    notes: list[str] = []
    if steps_per_job == 0:
        notes.append(f"a {job_seconds} s job cannot fit start-up, one step and a save: ask for a longer --time")
        jobs = 0
        wall = math.inf
    else:
        jobs = math.ceil(steps / steps_per_job)
        last = steps - (jobs - 1) * steps_per_job
        wall = (jobs - 1) * job_seconds + startup_seconds + last * per_step + save_seconds
    lost = job_seconds - steps_per_job * step_seconds if steps_per_job else float(job_seconds)
    return ChainEstimate(
        steps=steps,
        step_seconds=step_seconds,
        step_source=step_source,
        save_seconds=save_seconds,
        save_source=save_source,
        job_seconds=job_seconds,
        startup_seconds=startup_seconds,
        world_size=world_size,
        save_interval=interval,
        save_why=why,
        steps_per_job=steps_per_job,
        jobs=jobs,
        lost_per_requeue_s=lost,
        lost_work_s=lost_work_s(interval, step_seconds, save_seconds),
        wall_seconds=wall,
        gpu_hours=wall * world_size / 3600,
        budget_hours=budget_hours,
        notes=notes,
    )


def training_flops_per_step(params_total: int, full: bool, tokens_per_step: int) -> float:
    """6·N·T for a full fine-tune (forward 2, backward 4); 4·N·T with frozen base weights."""
    return (6 if full else 4) * params_total * tokens_per_step


def measured_times(run_dir: Path) -> dict:
    """Step/save seconds and world size recorded by a previous run in ``run_dir`` (empty when none)."""
    from affinage.run import RunDir
    from affinage.train.walltime import read_timing

    sessions = read_timing(RunDir(Path(run_dir)))
    found = measured(sessions)
    sizes = [s.get("world_size") for s in sessions if s.get("step_seconds")]
    startups = [s["first_step_after_s"] for s in sessions if s.get("first_step_after_s")]
    return {**found, "world_size": sizes[-1] if sizes else None, "startup_seconds": max(startups) if startups else None,
            "sessions": len(sessions)}


def plan_chain(plan, profile, *, time: Optional[str] = None, nodes: int = 1, gpus_per_node: Optional[int] = None,
               qos: Optional[str] = None, budget_hours: Optional[float] = None, timing_from: Optional[Path] = None) -> ChainEstimate:
    """The estimate for an ``affinage.plan.Plan`` on a cluster profile (its GPU kind and queue limit)."""
    from affinage.distributed.memory import GPU_PEAK_TFLOPS
    from affinage.errors import UserError

    recipe = plan.recipe
    t = recipe.training
    if plan.steps is None:
        raise UserError(f"recipe {recipe.name}: its number of steps is unknown ({plan.steps_note}); give training.duration in steps or tokens to plan jobs")
    allocation = profile.allocate(nodes, gpus_per_node, time, qos, account="plan")
    world = allocation.world_size
    run_dir = Path(timing_from) if timing_from else Path(recipe.run_dir())
    seen = measured_times(run_dir)
    notes = []
    if seen["step_seconds"]:
        step = seen["step_seconds"]
        source = f"measured in {run_dir / 'timing.json'}"
        if seen["world_size"] and seen["world_size"] != world:
            step = step * seen["world_size"] / world
            source += f" on {seen['world_size']} processes, scaled to {world} (assumes linear scaling)"
    else:
        if not profile.gpu_kind:
            raise UserError(
                f"cluster profile {profile.name} names no gpu_kind and {run_dir / 'timing.json'} does not exist: "
                "train the recipe once (a short run is enough) or add gpu_kind to the profile"
            )
        peak = GPU_PEAK_TFLOPS[profile.gpu_kind] * 1e12
        flops = training_flops_per_step(plan.params_total, recipe.method.kind == "full", plan.tokens_per_step)
        step = flops / (peak * ASSUMED_MFU * world)
        source = f"FLOPs estimate {flops:.3g} per step at {ASSUMED_MFU:.0%} of {profile.gpu_kind} peak {peak / 1e12:.0f} TFLOP/s × {world}"
        notes.append("no timing.json from a previous run: train a few hundred steps once and plan again for a measured step time")
    if seen["save_seconds"]:
        save, save_source = seen["save_seconds"], f"measured in {run_dir / 'timing.json'}"
    else:
        save = plan.checkpoint_bytes / ASSUMED_SAVE_BANDWIDTH
        save_source = f"{plan.checkpoint_bytes / 1e9:.1f} GB checkpoint at an assumed {ASSUMED_SAVE_BANDWIDTH / 1e9:.0f} GB/s"
    startup = seen["startup_seconds"] or ASSUMED_STARTUP_S
    estimate = chain_estimate(
        steps=plan.steps, step_seconds=step, save_seconds=save, job_seconds=allocation.time_s, world_size=world,
        max_lost_s=t.max_lost_minutes * 60, save_every=t.save_every, exit_margin_s=t.exit_margin_s,
        startup_seconds=startup, step_source=source, save_source=save_source, budget_hours=budget_hours,
    )
    estimate.notes = notes + estimate.notes
    return estimate


def _hours(seconds: float) -> str:
    return "∞" if math.isinf(seconds) else f"{seconds / 3600:.1f} h"


def format_chain(e: ChainEstimate, profile_name: str) -> str:
    lines = [
        f"cluster         {profile_name}: {e.world_size} GPU(s) per job, --time {_hours(e.job_seconds)}",
        f"step time       {e.step_seconds:.3g} s ({e.step_source})",
        f"save time       {e.save_seconds:.3g} s ({e.save_source})",
        f"checkpoints     every {e.save_interval} steps ({e.save_why})",
        f"per job         {e.steps_per_job:,} steps; {e.lost_per_requeue_s / 60:.1f} min of each job not training "
        f"(start-up {e.startup_seconds:.0f} s, checkpoint saves, exit margin)",
        f"jobs            {e.jobs} (the first and {max(0, e.jobs - 1)} requeue(s)) for {e.steps:,} steps",
        f"GPU-hours       {e.gpu_hours:,.1f} ({_hours(e.wall_seconds)} of wall time × {e.world_size} GPU(s))",
    ]
    if e.budget_hours is not None:
        verdict = "fits" if e.fits_budget else "does NOT fit"
        lines.append(f"budget          {e.budget_hours:,.1f} GPU-hours: {verdict} ({100 * e.gpu_hours / e.budget_hours:.0f}% of it)")
    lines += [f"note            {n}" for n in e.notes]
    return "\n".join(lines)
