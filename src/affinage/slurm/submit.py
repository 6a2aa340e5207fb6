"""Submit a recipe as a pipeline of sbatch jobs: resolved recipes, rendered scripts, dependencies.

``submit`` writes, before anything is queued, the resolved recipe into the run directory (the job
trains from that copy, so editing the recipe later does not change a queued job) and one script
per stage into ``RUN_DIR/slurm/``. Stages are chained with ``--dependency=afterok`` (``aftercorr``
between sweep arrays, task by task). A training stage that stops at its time limit requeues
itself under the same job id, so the stages after it wait for its final success.

A sweep (``--sweep training.learning_rate=1e-4,3e-4``; several sweeps make a grid) becomes one
job array per stage; task ``i`` runs in ``RUN_DIR/sweep-<i>`` with its own resolved recipe.
"""

from __future__ import annotations

from affinage.errors import UserError
import itertools
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from affinage.recipe.loader import LoadedRecipe, load_recipe_with_sources, write_resolved
from affinage.recipe.schema import OutputSpec
from affinage.slurm.profiles import ClusterProfile, load_profile
from affinage.slurm.render import JobScript, Stage, render_job
from affinage.slurm.status import active_jobs, append_event, jobs_file

# The stages `--pipeline` can name, each running the `affinage` command of the same name (a test in
# tests/cli checks that the CLI has each one; submit does not import the CLI, which imports submit).
BUILTIN_STAGES = {
    "prepare": Stage(
        "prepare", ("-m", "affinage.cli", "prepare", "{run_dir}/recipe.yaml", "--run-dir", "{run_dir}"), gpu=False
    ),
    "train": Stage(
        "train",
        ("-m", "affinage.cli", "train", "{run_dir}/recipe.yaml", "--run-dir", "{run_dir}"),
        distributed=True,
        requeue=True,
    ),
    "eval": Stage("eval", ("-m", "affinage.cli", "eval", "{run_dir}")),
}


class SubmitError(UserError, ValueError):
    """A submission that cannot go ahead; ``str()`` says why and what to do."""


@dataclass
class SubmitResult:
    run_dir: Path
    scripts: dict[str, Path]  # stage -> rendered script
    job_ids: dict[str, str] = field(default_factory=dict)  # stage -> job id (empty for a dry run)
    run_dirs: list[Path] = field(default_factory=list)  # the sweep members, or [run_dir]
    commands: list[list[str]] = field(default_factory=list)  # the sbatch command lines


def pipeline_stages(names: Sequence[Union[str, Stage]]) -> list[Stage]:
    """Stages for ``--pipeline prepare,train,eval``; an unknown name is an error listing the valid ones."""
    stages = []
    for item in names:
        if isinstance(item, Stage):
            stages.append(item)
        elif item in BUILTIN_STAGES:
            stages.append(BUILTIN_STAGES[item])
        else:
            raise SubmitError(f"pipeline stage {item!r}: unknown stage. Valid choices: {', '.join(BUILTIN_STAGES)}")
    if not stages:
        raise SubmitError(f"the pipeline is empty. Valid stages: {', '.join(BUILTIN_STAGES)}")
    if len({s.name for s in stages}) != len(stages):
        raise SubmitError("each stage may appear once in a pipeline")
    return stages


def _split_values(text: str) -> list[str]:
    """``1e-4,3e-4`` -> two values; commas inside brackets stay (``[q_proj,v_proj],all-linear``)."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    return values + [current]


def sweep_points(sweeps: Sequence[str]) -> list[list[str]]:
    """The ``--set`` overrides of each sweep member: the grid of every ``key=v1,v2,...`` given."""
    axes = []
    for text in sweeps:
        key, sep, values = text.partition("=")
        items = [v.strip() for v in _split_values(values)]
        if not sep or not key.strip() or not all(items):
            raise SubmitError(f"--sweep {text!r}: write --sweep path.to.key=value1,value2 (e.g. training.learning_rate=1e-4,3e-4)")
        axes.append([f"{key.strip()}={v}" for v in items])
    return [list(point) for point in itertools.product(*axes)] if axes else [[]]


def _sbatch(command: list[str], cwd: Path, env: dict) -> str:
    """Run sbatch --parsable and return the job id (``123`` of ``123;cluster``)."""
    try:
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SubmitError("sbatch not found: submit from a SLURM login node (or start slurm/local-cluster.sh)") from None
    job_id = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0 or not job_id.isdigit():
        raise SubmitError(f"sbatch refused {command[-1]}: {proc.stderr.strip() or proc.stdout.strip()}")
    return job_id


def _write_resolved_copy(source: LoadedRecipe, run_dir: Path) -> None:
    """RUN_DIR/recipe.yaml, the copy the job trains from; its output.dir is where it really runs."""
    here = str(run_dir).replace("{", "{{").replace("}", "}}")  # output.dir goes through str.format
    source.recipe = source.recipe.model_copy(update={"output": OutputSpec(dir=here)})
    write_resolved(source, run_dir / "recipe.yaml")


def submit(
    recipe_path: Union[str, os.PathLike],
    profile: Union[str, ClusterProfile],
    *,
    nodes: int = 1,
    gpus_per_node: Optional[int] = None,
    time: Optional[str] = None,
    qos: Optional[str] = None,
    account: Optional[str] = None,
    overrides: Sequence[str] = (),
    sweep: Sequence[str] = (),
    pipeline: Sequence[Union[str, Stage]] = ("train",),
    run_dir: Optional[Union[str, os.PathLike]] = None,
    dry_run: bool = False,
    grace_s: Optional[int] = None,
) -> SubmitResult:
    """Check everything, write resolved recipes and scripts into the run dir, then queue the pipeline.

    Raises :class:`SubmitError`, :class:`~affinage.slurm.profiles.ProfileError` or a
    :class:`~affinage.recipe.loader.RecipeError` before anything is queued when the request, the
    profile or the recipe is wrong. ``pipeline`` holds stage names or :class:`Stage` objects.
    """
    profile = profile if isinstance(profile, ClusterProfile) else load_profile(profile)
    stages = pipeline_stages(pipeline)
    gpu_job = profile.allocate(nodes, gpus_per_node, time, qos, account)
    grace = grace_s or profile.stop_grace_s
    if any(s.requeue for s in stages) and grace * 2 > gpu_job.time_s:
        raise SubmitError(
            f"the stop warning comes {grace} s before the time limit, more than half of --time "
            f"{gpu_job.time_s} s: the job would stop and requeue right away. Ask for more time or a smaller --grace"
        )
    members = sweep_points(sweep)
    loaded = [
        load_recipe_with_sources(recipe_path, [*overrides, *extra], world_size=gpu_job.world_size) for extra in members
    ]
    root = Path(os.path.abspath(run_dir or loaded[0].recipe.run_dir()))
    run_dirs = [root / f"sweep-{i}" for i in range(len(members))] if sweep else [root]
    labels = tuple(" ".join(extra) for extra in members) if sweep else ("",)
    env = profile.command_env()
    if not dry_run:
        busy = active_jobs(root, env)
        if busy:
            raise SubmitError(
                f"{root} already has queued or running jobs ({', '.join(f'{r.label} {r.state}' for r in busy)}): "
                "cancel them (scancel) or choose another --run-dir"
            )

    for member, source in zip(run_dirs, loaded):
        _write_resolved_copy(source, member)

    slurm_dir = root / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    provenance = (
        f"recipe {os.path.abspath(recipe_path)} (the job reads its resolved copy RUN_DIR/recipe.yaml)",
        *(f"--set {o}" for o in overrides),
        *(f"--sweep {s}" for s in sweep),
    )
    result = SubmitResult(run_dir=root, scripts={}, run_dirs=run_dirs)
    jobs: list[JobScript] = []
    for stage in stages:
        if not stage.gpu:
            allocation = profile.allocate_cpu(account)
        elif stage.distributed:
            allocation = gpu_job
        else:
            allocation = profile.allocate(1, gpus_per_node, time, qos, account)
        job = JobScript(
            profile=profile,
            allocation=allocation,
            stage=stage,
            job_name=f"affinage-{loaded[0].recipe.name}-{stage.name}",
            run_dirs=tuple(run_dirs),
            labels=labels,
            jobs_file=jobs_file(root),
            python=profile.python or shlex.quote(sys.executable),  # default: the submitting interpreter
            provenance=provenance,
            grace_s=grace,
            array=bool(sweep),
        )
        path = slurm_dir / job.script_name
        path.write_text(render_job(job), encoding="utf-8")
        path.chmod(0o755)
        result.scripts[stage.name] = path
        jobs.append(job)

    before: Optional[JobScript] = None
    before_id: Optional[str] = None
    for job in jobs:
        command, dependency = ["sbatch", "--parsable"], None
        if before is not None:
            kind = "aftercorr" if job.array else "afterok"
            dependency = f"{kind}:{before_id or f'<{before.stage.name} job id>'}"
            command.append(f"--dependency={dependency}")
        command.append(job.script_name)
        result.commands.append(command)
        before = job
        if dry_run:
            continue
        try:
            before_id = _sbatch(command, slurm_dir, env)
        except SubmitError:
            _cancel(result.job_ids.values(), env)
            raise
        result.job_ids[job.stage.name] = before_id
        append_event(
            jobs_file(root),
            "submitted",
            stage=job.stage.name,
            job_id=before_id,
            dependency=dependency,
            array=job.array,
            trains=job.stage.requeue,
            script=str(result.scripts[job.stage.name]),
            profile=profile.name,
            run_dirs=[str(d) for d in run_dirs],
            labels=list(labels) if sweep else [],
        )
    return result


def _cancel(job_ids, env: dict) -> None:
    """Cancel the stages already queued when a later one cannot be: no half pipelines."""
    ids = list(job_ids)
    if ids:
        subprocess.run(["scancel", *ids], env=env, capture_output=True)
        print(f"affinage: cancelled the stages already queued ({', '.join(ids)})", file=sys.stderr)

