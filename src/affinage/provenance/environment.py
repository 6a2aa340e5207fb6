"""Where and with what a run trained: git commit, library versions, hardware, SLURM, training time."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

from affinage.hardware import usable_cpus

LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "trl", "accelerate", "datasets", "safetensors",
             "bitsandbytes", "deepspeed", "numpy", "pydantic", "lm_eval", "matplotlib")

SCHEMA = "affinage.provenance/1"
PROVENANCE_FILE = "provenance.json"
SIDECAR_SUFFIXES = (".provenance.yaml", ".provenance.yml", ".provenance.json")
LANGUAGE_SAMPLE_RECORDS = 2000
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "trl", "accelerate", "datasets", "safetensors",
             "bitsandbytes", "deepspeed", "numpy", "pydantic", "lm_eval", "matplotlib")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_URL = re.compile(r"https?://[^\s\"'<>)]+")



def git_info(start: Optional[Path] = None) -> dict:
    """Commit of the affinage checkout (when it is one) and whether it has uncommitted changes.

    An installed affinage (wheel, git URL) reads no folder above its package: the commit comes
    from pip's install record (``direct_url.json`` of a git-URL install), else the version says it.
    """
    from affinage.resources import source_checkout

    folder = start or source_checkout()
    if folder is None or not (folder / ".git").exists():
        return installed_git_info()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_TERMINAL_PROMPT": "0", "HOME": os.environ.get("HOME", "/")}

    def git(*args: str) -> Optional[str]:
        try:
            p = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, env=env)
            return p.stdout.strip() if p.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def installed_git_info() -> dict:
    """What pip recorded about where the installed affinage came from (PEP 610 ``direct_url.json``)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        record = json.loads(distribution("affinage").read_text("direct_url.json") or "{}")
    except (PackageNotFoundError, ValueError):
        record = {}
    commit = (record.get("vcs_info") or {}).get("commit_id")
    if commit:
        return {"commit": commit, "dirty": False, "source": record.get("url")}
    return {"commit": None, "note": "affinage is installed from a package, not run from a git checkout"}


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name.replace("_", "-")) if name != "lm_eval" else version("lm_eval")
        except PackageNotFoundError:
            out[name] = None
    return out


def software() -> dict:
    import affinage

    return {"affinage": affinage.__version__, "git": git_info(), "python": platform.python_version(),
            "libraries": library_versions()}


def _cpu_name() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware(world_size: Optional[int] = None) -> dict:
    """The machine of the calling process (call it from the training process)."""
    import torch

    cores = usable_cpus()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = None
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
    slurm = {k.lower().removeprefix("slurm_"): os.environ[k] for k in
             ("SLURM_JOB_ID", "SLURM_CLUSTER_NAME", "SLURM_JOB_NUM_NODES", "SLURM_JOB_PARTITION") if k in os.environ}
    return {
        "recorded_by": "training process",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_cores_visible": cores,
        "memory_gb": round(mem, 1) if mem else None,
        "gpus": gpus,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "world_size": world_size,
        "device_kind": "gpu" if gpus else "cpu",
        "slurm": slurm or None,
    }


def training_time(metrics: list[dict]) -> tuple[Optional[float], int]:
    """(seconds of training loop summed over sessions, sessions) from ``train_runtime`` in metrics.jsonl."""
    total, sessions, current, last = 0.0, 0, None, None
    for row in metrics:
        rt = row.get("train_runtime")
        if not isinstance(rt, (int, float)):
            continue
        if current is None or (last is not None and rt < last):
            if current is not None:
                total += current
            sessions += 1
            current = 0.0
        current = max(current, rt)
        last = rt
    if current is not None:
        total += current
    return (total if sessions else None), sessions


def cluster_profile(run_root: Path):
    """The cluster profile the run was submitted with (RUN_DIR/slurm/jobs.jsonl), if any."""
    jobs = run_root / "slurm" / "jobs.jsonl"
    if not jobs.is_file():
        return None
    name = None
    for line in jobs.read_text(encoding="utf-8").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        name = e.get("profile") or name
    if not name:
        return None
    try:
        from affinage.slurm.profiles import load_profile

        return load_profile(name)
    except Exception:
        return None
