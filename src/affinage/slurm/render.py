"""Turn a stage, a profile and an allocation into a readable sbatch script (Jinja2, ``resources/slurm/``).

Two kinds of text meet in a script, and they are kept apart on purpose:

* trusted shell from the cluster profile (``setup`` lines, ``python``, ``env`` values), written as is
  so that ``$WORK`` or ``module load`` work;
* data from the recipe or the command line (run directories, arguments, labels): never written
  bare. In shell it goes through :func:`shell_word` (``shlex.quote``); in a comment through
  :func:`comment_text` (control characters escaped, so a newline cannot end the comment);
  in an ``#SBATCH`` line only after :func:`~affinage.slurm.profiles.sbatch_literal`.
"""

from __future__ import annotations

import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jinja2

from affinage.resources import resource_dir
from affinage.slurm.profiles import Allocation, ClusterProfile, sbatch_literal

RUN_DIR_TOKEN = "{run_dir}"  # in Stage.args: the job's run directory, read in the script as "$RUN_DIR"


@dataclass(frozen=True)
class Stage:
    """One job of a pipeline: what runs after the Python interpreter, and how it is launched.

    ``args`` are the interpreter's arguments (``("-m", "affinage.cli", "train", ...)`` or a script
    path); ``{run_dir}`` inside them stands for the job's run directory, so one script serves every
    task of a sweep array.
    """

    name: str
    args: tuple[str, ...]
    distributed: bool = False  # torchrun on every node with one process per GPU; else one process
    gpu: bool = True  # False: a CPU job on the profile's cpu_jobs nodes
    requeue: bool = False  # stop at the time limit through RUN_DIR/STOP, then requeue

    def __post_init__(self) -> None:
        sbatch_literal(self.name, "stage name")


@dataclass(frozen=True)
class JobScript:
    """Everything one sbatch script says."""

    profile: ClusterProfile
    allocation: Allocation
    stage: Stage
    job_name: str
    run_dirs: tuple[Path, ...]  # one per array task (one for a plain job)
    labels: tuple[str, ...]  # what distinguishes each run dir (sweep settings), shown as comments
    jobs_file: Path
    python: str  # shell words that start the interpreter
    provenance: tuple[str, ...] = ()  # comment lines: how the job was asked for
    grace_s: Optional[int] = None  # seconds of warning before the time limit (requeue stages)
    array: bool = False  # a job array, task i running in run_dirs[i] (a sweep)

    @property
    def script_name(self) -> str:
        return f"{self.stage.name}.sbatch"

    @property
    def log_pattern(self) -> str:
        return f"{self.stage.name}-%A_%a.out" if self.array else f"{self.stage.name}-%j.out"


def shell_word(arg: str) -> str:
    """``arg`` as one shell word; ``{run_dir}`` becomes ``"$RUN_DIR"``, everything else is quoted."""
    if "\0" in arg:
        raise ValueError(f"{arg!r}: a NUL byte cannot be passed to a program")
    if arg == "":
        return "''"
    return '"$RUN_DIR"'.join(shlex.quote(piece) if piece else "" for piece in arg.split(RUN_DIR_TOKEN))


def comment_text(text: str) -> str:
    """Text safe inside a ``#`` comment: newlines and other control characters shown escaped."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc" else ch for ch in str(text)
    )


def sbatch_options(job: JobScript) -> list[str]:
    """Every ``#SBATCH`` option of the job, in the order a reader checks them."""
    options = [f"--job-name={sbatch_literal(job.job_name, 'job name')}", *job.allocation.sbatch_options()]
    if job.array:
        options.append(f"--array=0-{len(job.run_dirs) - 1}")
    options += [f"--output={job.log_pattern}", "--open-mode=append"]
    if job.stage.requeue:
        options += [f"--signal=B:USR1@{int(job.grace_s or job.profile.stop_grace_s)}", "--requeue"]
    options.append("--kill-on-invalid-dep=yes")
    return options


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource_dir("slurm"))),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # shell, not HTML: quoting is explicit, through the filters below
    )
    env.filters["q"] = lambda value: shell_word(str(value))
    env.filters["comment"] = comment_text
    return env


def render_job(job: JobScript, template: str = "job.sbatch.j2") -> str:
    """The sbatch script for ``job``, from the shipped ``resources/slurm/<template>``."""
    if len(job.labels) != len(job.run_dirs):
        raise ValueError("one label per run directory")
    return _environment().get_template(template).render(
        job=job,
        profile=job.profile,
        allocation=job.allocation,
        stage=job.stage,
        sbatch=sbatch_options(job),
        args=[shell_word(a) for a in job.stage.args],
        grace=int(job.grace_s or job.profile.stop_grace_s),
        internet=job.profile.compute_internet if job.stage.gpu else job.profile.cpu_jobs.internet,
    )
