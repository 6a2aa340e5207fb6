"""The one place that knows a run directory's layout, and the writers of every file in it.

Every stage reads and writes files here, so a stage can be rerun alone and a person can read
what happened without any server::

    runs/<name>/
      recipe.yaml          the resolved recipe (after base: and --set)
      identity.json        what this run trains (hash of the training-relevant recipe fields, model
                           files, data cache key) and the changes allowed on resume (--allow-change)
      data_stats.json      per-source records, tokens, skips, truncations
      metrics.jsonl        one line per logged step (loss, lr, grad norm, tokens)
      logs/tensorboard/    TensorBoard event files
      checkpoints/checkpoint-N/   complete only when its COMPLETE marker exists
      final/               the trained adapter (LoRA/QLoRA) or model (full), with its tokenizer
      merged/              `affinage merge`: adapter merged into the base, safetensors
      summary.json         what the run did: steps, tokens, losses, time, outputs
      timing.json          measured step/save seconds and checkpoint/stop decisions, per session
      REQUEUE              written by a trainer that stopped on its own clock: the job script requeues
      STOP                 created by a person or a job to ask for a checkpoint and a stop
      distributed/         rendered DeepSpeed/FSDP config, runtime.json
      eval/                results.json, details.jsonl (affinage eval)
      provenance.json, report.md, ai_act_summary.md
      slurm/               job scripts, jobs.jsonl, job logs (affinage submit)

Every file affinage writes into a run directory (or a job folder) goes through :func:`write_text`,
:func:`write_json` or :func:`append_line`: atomic, scrubbed of secrets (:mod:`affinage.scrub`),
with the mode the umask gives (plus group read/write with ``sharing: group``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from affinage.errors import UserError
from affinage.scrub import scrub, scrub_data
from affinage.paths import ancestors

SHARING = ("user", "group")
_GROUP_SHARED = False  # set by apply_sharing("group") for the rest of the process

#: exit codes of ``affinage train`` that the sbatch template, ``affinage status`` and the
#: relauncher understand: 0 complete; 3 stopped on request (STOP file, SIGUSR1 → STOP) after a
#: complete checkpoint; 4 stopped by SIGTERM (scancel, preemption) after a complete checkpoint.
EXIT_STOPPED = 3
EXIT_SIGTERM = 4


# ---------------------------------------------------------------------------------- file modes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode(executable: bool = False) -> int:
    """The mode ``open()`` would give a new file under the current umask (mkstemp gives 0600)."""
    return (0o777 if executable else 0o666) & ~_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder (plus setgid when the group shares it)."""
    mode = 0o777 & ~_umask()
    return mode | 0o2070 if _GROUP_SHARED else mode


def apply_sharing(sharing: Optional[str]) -> None:
    """``sharing: group``: clear the group bits of this process's umask, so every file and folder it
    creates from now on (ours, the Trainer's, safetensors', the data cache's) is group read/write.
    Jean Zay projects share ``$WORK``/``$SCRATCH`` through their Unix group. ``user`` (default)
    leaves the umask as the person set it."""
    global _GROUP_SHARED
    if sharing == "group":
        os.umask(_umask() & ~0o070)
        _GROUP_SHARED = True


def make_dir(path: Path) -> Path:
    """``mkdir -p`` whose folders follow the umask; in a group-shared process the new folder also
    gets the setgid bit, so files created below it keep the project's group."""
    path = Path(path)
    missing = [p for p in ancestors(path) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    if _GROUP_SHARED:
        for p in missing:
            try:
                os.chmod(p, os.stat(p).st_mode | 0o2070)
            except OSError:
                pass
    return path


class FolderNotOursError(UserError):
    """A command was asked to write into (or replace) a folder that affinage did not create."""


def claim_folder(path: Path, markers: tuple[str, ...], what: str) -> Path:
    """``path`` if affinage may write there: it does not exist, is empty, or holds one of
    ``markers`` (files only affinage writes there). A folder of someone else's is never replaced."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FolderNotOursError(f"{what} {path} is a file, not a folder: choose another path")
    # the run lock (runlock.LOCK_NAME) is taken before the folder is claimed: it is affinage's, not content
    content = [p for p in path.iterdir() if p.name != ".affinage.lock"] if path.is_dir() else []
    if content and not any((path / m).exists() for m in markers):
        raise FolderNotOursError(
            f"{what} {path} already exists and was not written by affinage (it holds none of {', '.join(markers)}): "
            "affinage never replaces a folder it did not create. Choose a new or empty folder, or move this one away"
        )
    return path


def follow_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` the mode the umask gives (libraries that write
    through a private temporary file, as transformers 5 does for ``model.safetensors``, leave 0600)."""
    folder = Path(folder)
    fmode, dmode = file_mode(), dir_mode()
    for p in [folder, *folder.rglob("*")]:
        if p.is_symlink():
            continue
        try:
            os.chmod(p, dmode if p.is_dir() else fmode | (os.stat(p).st_mode & 0o111 & ~_umask()))
        except OSError:
            pass


# ------------------------------------------------------------------------------------- writers
def write_text(path: Path, text: str, *, executable: bool = False) -> Path:
    """Write ``text`` scrubbed of secrets, atomically: a reader sees the old content or the new one."""
    path = Path(path)
    make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(scrub(text))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode(executable))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(scrub_data(data), indent=2, ensure_ascii=False, default=str) + "\n")


def append_line(path: Path, text: str) -> None:
    """Append one scrubbed line with a single ``write`` (O_APPEND): concurrent writers do not
    interleave, and a torn line left by a kill is ended first so the new line stays whole."""
    path = Path(path)
    make_dir(path.parent)
    data = (scrub(text.rstrip("\n")) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode())
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
    finally:
        os.close(fd)


# old names, kept for callers written before the scrubbing writers moved here
atomic_write_text = write_text
atomic_write_json = write_json


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSON-lines file and the number of lines that are not one (a line torn
    by a kill, usually the last): those are skipped, never fatal."""
    rows: list[dict] = []
    bad = 0
    if not Path(path).exists():
        return rows, bad
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


# ------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    PROVENANCE = "provenance.json"  # also read from a base model's run (lineage)
    #: files only affinage writes at the top of a run directory: a folder holding one is a run
    MARKERS = ("recipe.yaml", "identity.json", "data_stats.json", "summary.json", "slurm")

    @classmethod
    def create(cls, root: str | os.PathLike) -> "RunDir":
        """The run directory at ``root``, created if needed; a non-empty folder that is not a run
        directory is refused (``--run-dir ~`` must not fill a home folder or delete its ``checkpoints/``)."""
        run = cls(Path(root).resolve())
        claim_folder(run.root, cls.MARKERS, "run directory")
        make_dir(run.root)
        return run

    def is_run(self) -> bool:
        return self.recipe.is_file()

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def identity(self) -> Path:
        return self.root / "identity.json"

    @property
    def data_stats(self) -> Path:
        return self.root / "data_stats.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def tensorboard(self) -> Path:
        return self.logs / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def final_tmp(self) -> Path:
        return self.root / "final.tmp"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def timing(self) -> Path:
        """Measured step/save seconds and walltime decisions, one entry per session (train/walltime.py)."""
        return self.root / "timing.json"

    @property
    def requeue_request(self) -> Path:
        """Written by a trainer that stopped on its own clock: the batch script requeues the job."""
        return self.root / "REQUEUE"

    @property
    def stop_file(self) -> Path:
        return self.root / "STOP"

    @property
    def distributed(self) -> Path:
        return self.root / "distributed"

    @property
    def runtime(self) -> Path:
        return self.distributed / "runtime.json"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_results(self) -> Path:
        return self.eval / "results.json"

    @property
    def provenance(self) -> Path:
        return self.root / self.PROVENANCE

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def jobs(self) -> Path:
        """Append-only events of the run's SLURM jobs (submitted, started, requeued, ended: slurm/status.py)."""
        return self.slurm / "jobs.jsonl"

    @classmethod
    def top_level_names(cls) -> frozenset[str]:
        """The names of every entry a run directory's layout puts at its top (from the properties above)."""
        probe = cls(Path("/run-dir"))
        names = set()
        for name in dir(cls):
            if isinstance(getattr(cls, name, None), property):
                try:
                    value = getattr(probe, name)
                except Exception:
                    continue
                if isinstance(value, Path) and value != probe.root and value.is_relative_to(probe.root):
                    names.add(value.relative_to(probe.root).parts[0])
        return frozenset(names)

    # ------------------------------------------------------------------------------- readers
    def read_metrics(self) -> list[dict]:
        """Every logged row of ``metrics.jsonl``; a torn line (a kill mid-write) is skipped."""
        return read_jsonl(self.metrics)[0]

    def torn_metrics_lines(self) -> int:
        return read_jsonl(self.metrics)[1]

    def repair_metrics(self) -> int:
        """Cut a torn last line (no newline: a kill mid-write) off ``metrics.jsonl``; returns 1 if cut, else 0."""
        path = self.metrics
        if not path.is_file() or path.stat().st_size == 0:
            return 0
        with open(path, "rb+") as fh:
            data = fh.read()
            if data.endswith(b"\n"):
                return 0
            fh.truncate(data.rfind(b"\n") + 1)
        return 1

    def append_metrics(self, row: dict) -> None:
        append_line(self.metrics, json.dumps(row))

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text(encoding="utf-8"))

    def read_identity(self) -> Optional[dict]:
        try:
            return json.loads(self.identity.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
