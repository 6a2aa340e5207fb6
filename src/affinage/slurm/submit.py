"""Submit a recipe as a pipeline of sbatch jobs: resolved recipes, rendered scripts, dependencies.

``submit`` writes, before anything is queued, the resolved recipe into the run directory (the job
trains from that copy, so editing the recipe later does not change a queued job) and one script
per stage into ``RUN_DIR/slurm/``. Stages are chained with ``--dependency=afterok`` (``aftercorr``
between sweep arrays, task by task). A training stage that stops at its time limit requeues
itself under the same job id, so the stages after it wait for its final success.

A sweep (``--sweep training.learning_rate=1e-4,3e-4``; several sweeps make a grid) becomes one
job array per stage; task ``i`` runs in ``RUN_DIR/sweep-<i>`` with its own resolved recipe.

Chains across recipes: ``--after JOBID`` makes the first job wait (afterok) for a job of an earlier
submission. ``--pipeline prepare,sft,dpo,eval --from-recipe SFT.yaml`` on a DPO/KTO recipe whose
``preference.from_run`` is SFT.yaml's run directory submits both: the SFT jobs (the recipe stages
listed before ``sft``, then its training) run in the SFT run directory, with their scripts and
``jobs.jsonl`` there; the DPO training waits afterok for the SFT training (a requeued job keeps its
id, so it waits for the final success); the DPO run's ``jobs.jsonl`` lists the whole chain.
"""

from __future__ import annotations

from affinage.errors import UserError
import dataclasses
import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from affinage.paths import expand_str
from affinage.recipe.loader import LoadedRecipe, load_recipe_with_sources, write_resolved
from affinage.recipe.preference import PREFERENCE_TASKS
from affinage.recipe.schema import OutputSpec
from affinage.run import RunDir, make_dir, write_text
from affinage.slurm.profiles import ClusterProfile, load_profile
from affinage.slurm.render import JobScript, Stage, render_job
from affinage.slurm.status import active_jobs, append_event, jobs_file

# The stages `--pipeline` can name, each running the `affinage` command of the same name (a test in
# tests/cli checks that the CLI has each one; submit does not import the CLI, which imports submit).
BUILTIN_STAGES = {
    # copies (or downloads) what the recipe reads into RUN_DIR/staged; the later stages read the staged copy
    "stage": Stage(
        "stage",
        ("-m", "affinage.cli", "stage", "{run_dir}/recipe.yaml", "--to", "{run_dir}/staged", "--download",
         "--write-recipe", "{run_dir}/recipe.yaml"),
        gpu=False,
        needs_internet=True,
    ),
    "check-offline": Stage("check-offline", ("-m", "affinage.cli", "check-offline", "{run_dir}/recipe.yaml"), gpu=False),
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


# Training stages named after what they train, for chains (`prepare,sft,dpo,eval`): `sft` trains the
# --from-recipe run, `dpo`/`kto` the preference recipe itself (the same command as `train`).
CHAIN_STAGES = {name: dataclasses.replace(BUILTIN_STAGES["train"], name=name) for name in ("sft", *PREFERENCE_TASKS)}
# Stages listed before `sft` run for both recipes, each in its own run directory.
RECIPE_STAGES = ("stage", "check-offline", "prepare")
TRAINING_NAMES = ("train", *PREFERENCE_TASKS)
_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")


class SubmitError(UserError, ValueError):
    """A submission that cannot go ahead; ``str()`` says why and what to do."""


@dataclass
class SubmitResult:
    run_dir: Path
    scripts: dict[str, Path]  # stage -> rendered script
    job_ids: dict[str, str] = field(default_factory=dict)  # stage -> job id (empty for a dry run)
    run_dirs: list[Path] = field(default_factory=list)  # the sweep members, or [run_dir]
    commands: list[list[str]] = field(default_factory=list)  # the sbatch command lines
    command_dirs: list[Path] = field(default_factory=list)  # where each runs (its run dir's slurm/)
    sft_run_dir: Optional[Path] = None  # with --pipeline ...,sft,...: the SFT run submitted first


def pipeline_stages(names: Sequence[Union[str, Stage]], task: Optional[str] = None) -> list[Stage]:
    """Stages for ``--pipeline prepare,train,eval``; an unknown name is an error listing the valid ones.

    ``sft``, ``dpo`` and ``kto`` are training stages; with ``task`` (the recipe's) ``dpo``/``kto`` must
    name it, and ``sft`` needs a preference recipe (see :func:`chain_split`).
    """
    valid = ", ".join([*BUILTIN_STAGES, *CHAIN_STAGES])
    stages = []
    for item in names:
        if isinstance(item, Stage):
            stages.append(item)
        elif item in BUILTIN_STAGES:
            stages.append(BUILTIN_STAGES[item])
        elif item in CHAIN_STAGES:
            stages.append(CHAIN_STAGES[item])
        else:
            raise SubmitError(f"pipeline stage {item!r}: unknown stage. Valid choices: {valid}")
    if not stages:
        raise SubmitError(f"the pipeline is empty. Valid stages: {valid}")
    if len({s.name for s in stages}) != len(stages):
        raise SubmitError("each stage may appear once in a pipeline")
    trainers = [s.name for s in stages if s.name in TRAINING_NAMES]
    if len(trainers) > 1:
        raise SubmitError(
            f"the pipeline trains the recipe twice ({' and '.join(trainers)}): name its training once "
            f"(train, or the recipe's task dpo/kto); the SFT run before it is the stage sft"
        )
    if task is not None:
        for name in PREFERENCE_TASKS:
            if name in trainers and task != name:
                fix = f"use {task}" if task in PREFERENCE_TASKS else "use train"
                raise SubmitError(f"pipeline stage {name!r} trains a task: {name} recipe, and this recipe has task: {task}: {fix}")
    return stages


def chain_split(stages: list[Stage], recipe, chained: bool, recipe_path) -> tuple[list[Stage], list[Stage]]:
    """(jobs of the SFT run, jobs of the recipe's run) for a pipeline with ``sft``; ([], stages) without.

    The recipe stages before ``sft`` (stage, check-offline, prepare) run for both recipes; the SFT
    copies are named ``sft-<stage>``. ``chained``: whether ``--from-recipe`` was given.
    """
    names = [s.name for s in stages]
    if "sft" not in names:
        if chained:
            raise SubmitError(
                "--from-recipe names the SFT recipe trained by the pipeline stage sft, and --pipeline has no sft: "
                "add it (e.g. --pipeline prepare,sft,dpo,eval), or leave --from-recipe out (use --after JOBID to wait for "
                "an SFT job submitted earlier)"
            )
        return [], stages
    where = f"recipe {recipe_path} has task: {recipe.task}"
    if recipe.task not in PREFERENCE_TASKS:
        raise SubmitError(
            f"pipeline stage sft trains the SFT run a DPO/KTO recipe starts from (its preference.from_run), and {where}: "
            "submit the SFT recipe itself with --pipeline prepare,train,eval, or submit the DPO/KTO recipe with sft"
        )
    if recipe.preference is None or recipe.preference.from_run is None:
        raise SubmitError(
            f"pipeline stage sft: recipe {recipe_path} has no preference.from_run, so nothing says which SFT run it starts "
            "from: set preference.from_run to the SFT recipe's output.dir (and preference.start: merged or stacked), "
            "or drop sft from --pipeline"
        )
    if not chained:
        raise SubmitError(
            f"pipeline stage sft needs the SFT recipe: give --from-recipe SFT_RECIPE (its output.dir must be "
            f"preference.from_run {recipe.preference.from_run!r}), or drop sft and wait for an SFT job already queued with --after JOBID"
        )
    at = names.index("sft")
    trainer = next((n for n in names if n in TRAINING_NAMES), None)
    if trainer is None or names.index(trainer) < at:
        raise SubmitError(
            f"pipeline stage sft must come before the recipe's training ({recipe.task}), e.g. --pipeline prepare,sft,{recipe.task},eval"
        )
    early = [s for s in stages[:at] if s.name not in RECIPE_STAGES]
    if early:
        raise SubmitError(
            f"pipeline stage {early[0].name!r} comes before sft: only {', '.join(RECIPE_STAGES)} may (they run for both recipes)"
        )
    sft_jobs = [dataclasses.replace(s, name=f"sft-{s.name}") for s in stages[:at]] + [stages[at]]
    return sft_jobs, [s for s in stages if s.name != "sft"]


def after_ids(after: Sequence[str]) -> list[str]:
    """``--after`` values, checked: a job id (``123``) or an array task (``123_4``), nothing else."""
    ids = []
    for value in after:
        value = str(value).strip()
        if not _JOB_ID.fullmatch(value):
            raise SubmitError(
                f"--after {value!r}: give the id of a job submitted earlier, digits (123) or an array task (123_4), "
                "as printed by affinage submit or squeue"
            )
        ids.append(value)
    return ids


def _same_dir(from_run: str, sft_root: Path) -> bool:
    return Path(os.path.abspath(expand_str(from_run))) == sft_root


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
    """RUN_DIR/recipe.yaml, the copy the job trains from; its output.dir is where it really runs.

    The job runs in RUN_DIR/slurm, so what is relative to the current directory where ``submit`` runs
    is made absolute: ``preference.from_run``, and a model folder found here (``runs/demo-cpt/final``;
    a name not found here may be a Hugging Face id and stays as written).
    """
    here = str(run_dir).replace("{", "{{").replace("}", "}}")  # output.dir goes through str.format
    update: dict = {"output": OutputSpec(dir=here)}

    def relative(value: Optional[str]) -> bool:
        return bool(value) and not os.path.isabs(value) and value[0] not in "$~"

    p, model = source.recipe.preference, source.recipe.model
    if p is not None and relative(p.from_run):
        update["preference"] = p.model_copy(update={"from_run": os.path.abspath(p.from_run)})
    folders = {k: os.path.abspath(v) for k in ("name_or_path", "tokenizer") if relative(v := getattr(model, k)) and os.path.isdir(v)}
    if folders:
        update["model"] = model.model_copy(update=folders)
    source.recipe = source.recipe.model_copy(update=update)
    write_resolved(source, RunDir(run_dir).recipe)


@dataclass
class _Planned:
    """One job of a submission before it is queued."""

    job: JobScript
    root: Path  # the run directory whose slurm/ holds its script and jobs.jsonl
    waits: list[str]  # stages of this submission it waits for
    external: list[str]  # --after job ids


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
    after: Sequence[str] = (),
    from_recipe: Optional[Union[str, os.PathLike]] = None,
) -> SubmitResult:
    """Check everything, write resolved recipes and scripts into the run dir, then queue the pipeline.

    Raises :class:`SubmitError`, :class:`~affinage.slurm.profiles.ProfileError` or a
    :class:`~affinage.recipe.loader.RecipeError` before anything is queued when the request, the
    profile or the recipe is wrong. ``pipeline`` holds stage names or :class:`Stage` objects;
    ``after``: job ids the first job waits for (afterok); ``from_recipe``: the SFT recipe of the
    ``sft`` stage (module docstring).
    """
    profile = profile if isinstance(profile, ClusterProfile) else load_profile(profile)
    stages = pipeline_stages(pipeline)
    external = after_ids(after)
    gpu_job = profile.allocate(nodes, gpus_per_node, time, qos, account)
    grace = grace_s if grace_s is not None else profile.stop_grace_s
    if grace < 0:
        raise SubmitError(f"--grace {grace}: give seconds of warning before the time limit (0: no signal, the trainer's clock alone)")
    if any(s.requeue for s in stages) and grace * 2 > gpu_job.time_s:
        raise SubmitError(
            f"the stop warning comes {grace} s before the time limit, more than half of --time "
            f"{gpu_job.time_s} s: the job would stop and requeue right away. Ask for more time or a smaller --grace"
        )
    for stage in stages:
        internet = profile.cpu_jobs.internet if not stage.gpu else profile.compute_internet
        if stage.needs_internet and not internet:
            where = f"partition {profile.cpu_jobs.partition}" if not stage.gpu and profile.cpu_jobs.partition else "its compute nodes"
            raise SubmitError(
                f"stage {stage.name!r} needs the network, and profile {profile.name} runs it on {where}, which has none: "
                f"run `affinage {stage.name} RECIPE --to DIR` on a login or prepost node, then submit DIR/recipe.yaml without {stage.name!r}"
            )
    members = sweep_points(sweep)
    loaded = [
        load_recipe_with_sources(recipe_path, [*overrides, *extra], world_size=gpu_job.world_size) for extra in members
    ]
    pipeline_stages(pipeline, task=loaded[0].recipe.task)  # dpo/kto name the recipe's task
    sft_stages, stages = chain_split(stages, loaded[0].recipe, from_recipe is not None, recipe_path)
    root = Path(os.path.abspath(run_dir or loaded[0].recipe.run_dir()))
    run_dirs = [root / f"sweep-{i}" for i in range(len(members))] if sweep else [root]
    labels = tuple(" ".join(extra) for extra in members) if sweep else ("",)
    sft_source, sft_root = None, None
    if sft_stages:
        sft_source = load_recipe_with_sources(from_recipe, (), world_size=gpu_job.world_size)
        sft_root = Path(os.path.abspath(sft_source.recipe.run_dir()))
        for extra, source in zip(members, loaded):
            from_run = source.recipe.preference.from_run
            if not _same_dir(from_run, sft_root):
                member = f" (sweep member {' '.join(extra)})" if sweep else ""
                raise SubmitError(
                    f"--from-recipe {from_recipe} trains in {sft_root}, and recipe {recipe_path}{member} starts from "
                    f"preference.from_run {from_run!r} = {os.path.abspath(expand_str(from_run))}: they must be the same "
                    f"folder. Set output.dir of {from_recipe} to the from_run folder, or --set preference.from_run={sft_root}"
                )
        if sft_root in run_dirs or root == sft_root:
            raise SubmitError(f"the SFT run and the {loaded[0].recipe.task} run are both {sft_root}: give the DPO/KTO run its own --run-dir")
    env = profile.command_env()
    if not dry_run:
        for folder in [root] + ([sft_root] if sft_root else []):
            busy = active_jobs(folder, env)
            if busy:
                raise SubmitError(
                    f"{folder} already has queued or running jobs ({', '.join(f'{r.label} {r.state}' for r in busy)}): "
                    "cancel them (scancel) or choose another --run-dir"
                )

    for member, source in zip(run_dirs, loaded):
        _write_resolved_copy(source, member)
    if sft_source is not None:
        _write_resolved_copy(sft_source, sft_root)

    provenance = (
        f"recipe {os.path.abspath(recipe_path)} (the job reads its resolved copy RUN_DIR/recipe.yaml)",
        *(f"--set {o}" for o in overrides),
        *(f"--sweep {s}" for s in sweep),
        *(f"--after {a}" for a in external),
    )
    result = SubmitResult(run_dir=root, scripts={}, run_dirs=run_dirs, sft_run_dir=sft_root)

    def plan(stage: Stage, folder: Path, recipe_name: str, dirs: tuple, labels: tuple, array: bool, lines: tuple) -> JobScript:
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
            job_name=f"affinage-{recipe_name}-{stage.name}",
            run_dirs=dirs,
            labels=labels,
            jobs_file=jobs_file(folder),
            python=profile.python or shlex.quote(sys.executable),  # default: the submitting interpreter
            provenance=lines,
            grace_s=grace,
            array=array,
        )
        path = make_dir(RunDir(folder).slurm) / job.script_name
        write_text(path, render_job(job), executable=True)  # scrubbed: --set comments may hold a token
        result.scripts[stage.name] = path
        return job

    planned: list[_Planned] = []
    if sft_stages:
        lines = (f"recipe {os.path.abspath(from_recipe)}: the SFT run that {os.path.abspath(recipe_path)} starts from "
                 "(the job reads its resolved copy RUN_DIR/recipe.yaml)", *(f"--after {a}" for a in external))
        for i, stage in enumerate(sft_stages):
            job = plan(stage, sft_root, sft_source.recipe.name, (sft_root,), ("",), False, lines)
            planned.append(_Planned(job, sft_root, [sft_stages[i - 1].name] if i else [], [] if i else external))
    for i, stage in enumerate(stages):
        job = plan(stage, root, loaded[0].recipe.name, tuple(run_dirs), labels, bool(sweep), provenance)
        waits = [stages[i - 1].name] if i else []
        if sft_stages and stage.name in TRAINING_NAMES:
            waits.append("sft")  # afterok: a requeued SFT job keeps its id, this waits for its final success
        planned.append(_Planned(job, root, waits, [] if i else external))

    by_name = {p.job.stage.name: p for p in planned}
    for item in planned:
        job, slurm_dir = item.job, RunDir(item.root).slurm
        command = ["sbatch", "--parsable"]
        groups: dict[str, list[str]] = {}
        for name in item.waits:
            kind = "aftercorr" if job.array and by_name[name].job.array else "afterok"
            groups.setdefault(kind, []).append(result.job_ids.get(name) or f"<{name} job id>")
        if item.external:
            groups.setdefault("afterok", []).extend(item.external)
        dependency = ",".join(f"{kind}:{':'.join(ids)}" for kind, ids in groups.items()) or None
        if dependency:
            command.append(f"--dependency={dependency}")
        command.append(job.script_name)
        result.commands.append(command)
        result.command_dirs.append(slurm_dir)
        if dry_run:
            continue
        try:
            job_id = _sbatch(command, slurm_dir, env)
        except SubmitError:
            _cancel(result.job_ids.values(), env)
            raise
        result.job_ids[job.stage.name] = job_id
        event = dict(
            stage=job.stage.name,
            job_id=job_id,
            dependency=dependency,
            array=job.array,
            trains=job.stage.requeue,
            script=str(result.scripts[job.stage.name]),
            profile=profile.name,
            run_dirs=[str(d) for d in job.run_dirs],
            labels=list(job.labels) if job.array else [],
        )
        append_event(jobs_file(item.root), "submitted", **event)
        if item.root != root:  # the SFT jobs, also listed in the DPO run's file: its status shows the chain
            append_event(jobs_file(root), "submitted", **event, recorded_in=str(item.root))
    return result


def _cancel(job_ids, env: dict) -> None:
    """Cancel the stages already queued when a later one cannot be: no half pipelines."""
    ids = list(job_ids)
    if ids:
        subprocess.run(["scancel", *ids], env=env, capture_output=True)
        print(f"affinage: cancelled the stages already queued ({', '.join(ids)})", file=sys.stderr)

