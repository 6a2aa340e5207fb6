"""Cluster profiles: what a cluster offers and how to ask for it.

Shipped profiles are package data (``affinage/resources/clusters/<name>.yaml``, ``configs/clusters/``
in a checkout) named by ``--cluster NAME``; ``--cluster path/to/own.yaml`` reads the user's file.

A profile is infrastructure a researcher may copy and edit, so it is validated as strictly as a
recipe (unknown keys are errors, every error names the file and the key). It is trusted shell
text for its ``setup`` lines, ``python`` and ``env`` values (module loads, ``$WORK``); everything
that comes from a recipe or the command line is data, checked here before it can reach an
``#SBATCH`` line (:func:`sbatch_literal`) and shell-quoted everywhere else (``render``).

:meth:`ClusterProfile.allocate` turns ``--nodes/--time/--qos/--account`` into an
:class:`Allocation` and refuses, before anything is submitted, a time longer than the QoS
allows or a QoS the GPU kind does not have, listing the valid choices.
"""

from __future__ import annotations

from affinage.errors import UserError
from affinage.recipe.problems import validate
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from affinage.resources import ResourceError, list_resources, resource_dir, resource_path


# What an #SBATCH value may hold: sbatch splits these lines on blanks and honours quotes, and a
# newline would end the comment and start a shell command. Letters, digits and a few separators.
_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9._:@,=+%/-]+$")
_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<h>\d+):(?P<m>[0-5]\d):(?P<s>[0-5]\d)$")
_MEMORY = re.compile(r"^\d+[KMGT]?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ProfileError(UserError, ValueError):
    """A profile that cannot be read, or a request the profile cannot satisfy; ``str()`` says why."""


def sbatch_literal(value: object, what: str) -> str:
    """``value`` as text safe for an ``#SBATCH`` line, or a ProfileError naming ``what``."""
    text = str(value)
    if not _SBATCH_SAFE.match(text):
        raise ProfileError(
            f"{what} {text!r} cannot go into an #SBATCH line: use only letters, digits and . _ : @ , = + % / -"
        )
    return text


def parse_time(text: str) -> int:
    """Seconds in a SLURM time limit written ``HH:MM:SS`` or ``D-HH:MM:SS``."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise ProfileError(f"time {text!r}: write HH:MM:SS (e.g. 20:00:00) or D-HH:MM:SS (e.g. 1-12:00:00)")
    return ((int(m["d"] or 0) * 24 + int(m["h"])) * 60 + int(m["m"])) * 60 + int(m["s"])


def format_time(seconds: int) -> str:
    """``HH:MM:SS`` with as many hour digits as needed (SLURM accepts ``100:00:00``)."""
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueueLimits(_Strict):
    max_time: str = Field(description="longest --time this QoS (or partition) accepts, HH:MM:SS")
    max_nodes: Optional[int] = Field(None, description="most nodes one job may ask for")

    @field_validator("max_time")
    @classmethod
    def _time(cls, v: str) -> str:
        return format_time(parse_time(v))


class Queues(_Strict):
    """The QoS (Jean Zay) or partitions (LUMI) a GPU job picks from with ``--qos``."""

    flag: Literal["qos", "partition"] = Field("qos", description="the #SBATCH option the chosen name goes to")
    default: str
    choices: dict[str, QueueLimits] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_listed(self) -> "Queues":
        if self.default not in self.choices:
            raise ValueError(f"default {self.default!r} is not one of choices: {', '.join(self.choices)}")
        for name in self.choices:
            sbatch_literal(name, "queue name")
        return self


class CpuJobs(_Strict):
    """Where CPU-only stages (``prepare``) run, e.g. Jean Zay's ``prepost`` partition."""

    partition: Optional[str] = None
    cpus: int = Field(ge=1)
    time: str = Field(description="--time of a CPU job, HH:MM:SS")
    internet: bool = Field(False, description="whether these nodes reach the internet (said in the scripts)")

    @field_validator("time")
    @classmethod
    def _time(cls, v: str) -> str:
        return format_time(parse_time(v))

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else sbatch_literal(v, "partition")


class Storage(_Strict):
    cache: str = Field(description="folder for HF/torch/pip caches, on work storage: e.g. $WORK/.cache")
    tmp: Optional[str] = Field(None, description="per-job temporary folder, exported as TMPDIR")

    @field_validator("cache", "tmp")
    @classmethod
    def _not_home(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        _shell_word_ok(v)
        if v.startswith("~") or re.search(r"\$\{?HOME\b", v):
            raise ValueError(f"{v!r} is under $HOME: home quotas are tiny on clusters; use $WORK or $SCRATCH")
        return v


def _shell_word_ok(v: str) -> str:
    """Profile shell text may use variables, never command substitution or several lines."""
    if "\n" in v or "`" in v or "$(" in v:
        raise ValueError(f"{v!r}: no newlines, backticks or $( ) here")
    return v


class ClusterProfile(_Strict):
    name: str
    description: str
    slurm_conf: Optional[str] = Field(None, description="SLURM_CONF for sbatch/scontrol when not set already")
    account: Optional[str] = Field(None, description="account pattern, {project} replaced, e.g. {project}@h100")
    project_env: Optional[str] = Field(None, description="variable holding the default project (Jean Zay: IDRPROJ)")
    constraint: Optional[str] = None
    partition: Optional[str] = Field(None, description="fixed partition for GPU jobs (when queues.flag is qos)")
    gpus_per_node: int = Field(ge=0, description="GPUs per node; 0 for a CPU cluster")
    gpu_flag: Literal["gres", "gpus-per-node"] = "gres"
    processes_per_node: Optional[int] = Field(None, ge=1, description="processes per node on a CPU cluster")
    cpus_per_process: int = Field(ge=1, description="CPUs asked per GPU (per process on a CPU cluster)")
    memory_per_node: Optional[str] = Field(None, description="--mem; leave both memory keys out to get memory by CPUs")
    memory_per_gpu: Optional[str] = Field(None, description="--mem-per-gpu")
    hint_nomultithread: bool = True
    queues: Queues
    cpu_jobs: CpuJobs
    compute_internet: bool = Field(False, description="whether GPU compute nodes reach the internet")
    stop_grace_s: int = Field(600, ge=5, description="seconds between the USR1 warning and the time limit")
    setup: list[str] = Field(default_factory=list, description="shell lines run first in every job (modules)")
    python: Optional[str] = Field(None, description="Python command on compute nodes; default: the submitting interpreter")
    storage: Storage
    env: dict[str, str] = Field(default_factory=dict, description="exported in every job (NCCL, network)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", v):
            raise ValueError(f"{v!r}: lower-case letters, digits and '-'")
        return v

    @field_validator("constraint", "partition", "memory_per_node", "memory_per_gpu")
    @classmethod
    def _literal(cls, v: Optional[str], info) -> Optional[str]:
        if v is not None:
            sbatch_literal(v, info.field_name)
            if info.field_name.startswith("memory") and not _MEMORY.match(v):
                raise ValueError(f"{v!r}: write a size such as 480G or 64000M")
        return v

    @field_validator("setup")
    @classmethod
    def _one_line_each(cls, v: list[str]) -> list[str]:
        for line in v:
            if "\n" in line:
                raise ValueError(f"{line!r}: one shell line per list item")
        return v

    @field_validator("python")
    @classmethod
    def _python(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else _shell_word_ok(v)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not a variable name")
            _shell_word_ok(str(value))
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterProfile":
        if self.gpus_per_node == 0 and self.processes_per_node is None:
            raise ValueError("processes_per_node is required when gpus_per_node is 0 (a CPU cluster)")
        if self.memory_per_node and self.memory_per_gpu:
            raise ValueError("give memory_per_node or memory_per_gpu, not both")
        if self.queues.flag == "partition" and self.partition:
            raise ValueError("partition is set while queues.flag is partition: the queue already names the partition")
        return self

    def command_env(self) -> dict[str, str]:
        """Environment for sbatch/scontrol: the profile's SLURM_CONF unless one is set already."""
        env = dict(os.environ)
        if self.slurm_conf and "SLURM_CONF" not in env:
            env["SLURM_CONF"] = self.slurm_conf
        return env

    # ------------------------------------------------------------------------------ requests
    def workers_per_node(self, gpus_per_node: Optional[int] = None) -> int:
        """Processes per node: one per GPU, or ``processes_per_node`` on a CPU cluster."""
        if self.gpus_per_node == 0:
            count = gpus_per_node or self.processes_per_node
        else:
            count = gpus_per_node or self.gpus_per_node
            if count > self.gpus_per_node:
                raise ProfileError(f"{self.name} has {self.gpus_per_node} GPUs per node; --gpus-per-node {count} is too many")
        if count < 1:
            raise ProfileError("--gpus-per-node must be at least 1")
        return count

    def queue(self, requested: Optional[str]) -> str:
        """The queue named by ``--qos`` (exact name, or a unique suffix such as ``t4``), or the default."""
        if requested is None:
            return self.queues.default
        names = list(self.queues.choices)
        if requested in names:
            return requested
        matches = [n for n in names if n.endswith("-" + requested)]
        if len(matches) == 1:
            return matches[0]
        where = _profiles_having_queue(requested, exclude=self.name)
        hint = f" ({requested} belongs to {', '.join(where)})" if where else ""
        raise ProfileError(
            f"{self.name} has no {self.queues.flag} {requested!r}{hint}. Valid choices: {self._queue_choices()}"
        )

    def _queue_choices(self) -> str:
        return ", ".join(f"{n} (max {q.max_time})" for n, q in self.queues.choices.items())

    def resolve_account(self, account: Optional[str]) -> Optional[str]:
        """``--account`` as a project (filled into the pattern) or a full account; else the project variable."""
        if account is None and self.project_env:
            account = os.environ.get(self.project_env) or None
        if account is None:
            if self.account:
                raise ProfileError(
                    f"{self.name} needs an account: pass --account PROJECT (charged as {self.account})"
                    + (f" or set ${self.project_env}" if self.project_env else "")
                )
            return None
        account = sbatch_literal(account, "account")
        if not self.account:
            return account
        pattern = re.escape(self.account).replace(re.escape("{project}"), "[^@]+")
        full = account if re.fullmatch(pattern, account) else self.account.format(project=account)
        if not re.fullmatch(pattern, full):
            raise ProfileError(f"account {account!r} does not fit {self.name}, which charges accounts like {self.account}")
        return sbatch_literal(full, "account")

    def allocate(
        self,
        nodes: int = 1,
        gpus_per_node: Optional[int] = None,
        time: Optional[str] = None,
        qos: Optional[str] = None,
        account: Optional[str] = None,
    ) -> "Allocation":
        """Check a GPU-job request against this profile; the result holds only literal, safe values."""
        if nodes < 1:
            raise ProfileError("--nodes must be at least 1")
        workers = self.workers_per_node(gpus_per_node)
        queue = self.queue(qos)
        limits = self.queues.choices[queue]
        seconds = parse_time(time) if time else parse_time(limits.max_time)
        if seconds > parse_time(limits.max_time):
            fits = [n for n, q in self.queues.choices.items() if parse_time(q.max_time) >= seconds]
            raise ProfileError(
                f"--time {format_time(seconds)} is longer than {queue} allows (max {limits.max_time}). "
                f"Valid choices on {self.name}: {self._queue_choices()}"
                + (f"; for {format_time(seconds)} use --qos {' or '.join(fits)}" if fits else "")
            )
        if limits.max_nodes is not None and nodes > limits.max_nodes:
            raise ProfileError(f"{queue} allows at most {limits.max_nodes} nodes per job (asked {nodes}). Valid choices: {self._queue_choices()}")
        gpus = workers if self.gpus_per_node else 0
        options = [f"--nodes={nodes}", "--ntasks-per-node=1"]
        if gpus:
            options.append(f"--gres=gpu:{gpus}" if self.gpu_flag == "gres" else f"--gpus-per-node={gpus}")
        options.append(f"--cpus-per-task={workers * self.cpus_per_process}")
        if self.memory_per_node:
            options.append(f"--mem={self.memory_per_node}")
        elif self.memory_per_gpu and gpus:
            options.append(f"--mem-per-gpu={self.memory_per_gpu}")
        if self.hint_nomultithread:
            options.append("--hint=nomultithread")
        options.append(f"--time={format_time(seconds)}")
        return Allocation(
            account=self.resolve_account(account),
            partition=queue if self.queues.flag == "partition" else self.partition,
            qos=queue if self.queues.flag == "qos" else None,
            constraint=self.constraint,
            resources=tuple(options),
            time_s=seconds,
            nodes=nodes,
            workers_per_node=workers,
            cpus_per_worker=self.cpus_per_process,
            gpu=bool(gpus),
        )

    def allocate_cpu(self, account: Optional[str] = None) -> "Allocation":
        """One CPU task on the profile's CPU nodes (``cpu_jobs``), for stages such as ``prepare``."""
        options = ["--nodes=1", "--ntasks-per-node=1", f"--cpus-per-task={self.cpu_jobs.cpus}"]
        if self.memory_per_node:
            options.append(f"--mem={self.memory_per_node}")
        if self.hint_nomultithread:
            options.append("--hint=nomultithread")
        options.append(f"--time={self.cpu_jobs.time}")
        return Allocation(
            account=self.resolve_account(account),
            partition=self.cpu_jobs.partition,
            qos=None,
            constraint=None,
            resources=tuple(options),
            time_s=parse_time(self.cpu_jobs.time),
            nodes=1,
            workers_per_node=1,
            cpus_per_worker=self.cpu_jobs.cpus,
            gpu=False,
        )


@dataclass(frozen=True)
class Allocation:
    """What one job asks SLURM for, as literal values already checked by :func:`sbatch_literal`."""

    account: Optional[str]
    partition: Optional[str]
    qos: Optional[str]
    constraint: Optional[str]
    resources: tuple[str, ...]
    time_s: int
    nodes: int
    workers_per_node: int
    cpus_per_worker: int
    gpu: bool

    @property
    def world_size(self) -> int:
        return self.nodes * self.workers_per_node

    def sbatch_options(self) -> list[str]:
        """The ``#SBATCH`` options, account and queue first (what a reader checks first)."""
        named = [("account", self.account), ("partition", self.partition), ("qos", self.qos), ("constraint", self.constraint)]
        return [f"--{key}={value}" for key, value in named if value] + list(self.resources)


# ---------------------------------------------------------------------------------- loading
def profile_names() -> list[str]:
    """The shipped profiles, by name (``affinage/resources/clusters/<name>.yaml``)."""
    return list_resources("clusters")


def load_profile(name_or_path: str | os.PathLike) -> ClusterProfile:
    """A shipped profile by name (``jean-zay-h100``), or the user's own YAML file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        try:
            path = resource_path("clusters", str(name_or_path))
        except ResourceError:
            raise ProfileError(f"no cluster profile {str(name_or_path)!r}. Valid choices: {', '.join(profile_names())}") from None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ProfileError(f"{path}: cannot read the profile: {e}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile is a mapping of keys (name:, description:, ...)")
    profile = validate(ClusterProfile, data, file=path, error=ProfileError)
    if profile.name != path.stem and path.parent == resource_dir("clusters"):
        raise ProfileError(f"{path}: name: {profile.name!r} should match the file name {path.stem!r}")
    return profile


def _profiles_having_queue(queue: str, exclude: str) -> list[str]:
    """Other shipped profiles that offer ``queue`` (to say "that QoS belongs to jean-zay-a100")."""
    found = []
    for name in profile_names():
        if name == exclude:
            continue
        try:
            if queue in load_profile(name).queues.choices:
                found.append(name)
        except ProfileError:
            continue
    return found
