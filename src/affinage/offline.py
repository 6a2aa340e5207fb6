"""`affinage check-offline RECIPE`: prove a (staged) recipe needs no network, as on a compute node.

It runs ``affinage plan`` and ``affinage smoke`` of the recipe in child processes that cannot reach
the network, two ways at once:

* a new network namespace holding only loopback (``unshare -n``; root, or unprivileged user
  namespaces with ``unshare -rn``), so nothing at all gets out, Python or not;
* a ``sitecustomize`` put first on ``PYTHONPATH`` that refuses every socket connection and name
  lookup that is not loopback, and records where it came from (the file and line of the caller
  and the host), so the failure names what tried; plus every offline variable
  (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``WANDB_MODE``...).

Where no namespace can be made (a cluster login node without user namespaces) the second alone runs,
and the report says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from affinage.errors import UserError

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "offline",
    "WANDB_DISABLED": "true",
    "NO_PROXY": "*",
    "no_proxy": "*",
}
LOG_ENV = "AFFINAGE_OFFLINE_LOG"

# Loaded by every Python child through PYTHONPATH: refuses non-loopback connections, names the caller.
GUARD = r'''
import json, os, socket, sys, sysconfig, traceback

_LOG = os.environ.get("AFFINAGE_OFFLINE_LOG")
_LOCAL = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "", None}


def _local(host):
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    return host in _LOCAL or (isinstance(host, str) and (host.startswith("127.") or host.endswith(".localhost")))


_STDLIB = sysconfig.get_paths()["stdlib"]
_HTTP = ("/urllib3/", "/requests/", "/httpx/", "/httpcore/", "/h11/", "/anyio/", "/aiohttp/")


def _refuse(what, host, port):
    frames = [f for f in traceback.extract_stack()[:-2] if "sitecustomize" not in f.filename]
    # who asked: the innermost frame that is neither the standard library nor an HTTP client library
    asking = [f for f in frames if not f.filename.startswith(_STDLIB) and not any(h in f.filename for h in _HTTP)]
    caller = asking[-1] if asking else (frames[-1] if frames else None)
    where = f"{caller.filename}:{caller.lineno}" if caller else "?"
    row = {"what": what, "host": str(host), "port": port, "where": where,
           "stack": [f"{f.filename}:{f.lineno} {f.name}" for f in frames[-40:]], "argv": sys.argv}
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
    raise OSError(101, f"affinage check-offline: network access to {host}:{port} refused ({what} from {where})")


_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, port, *args, **kwargs):
    if not _local(host):
        _refuse("name lookup", host, port)
    return _getaddrinfo(host, port, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _address_ok(sock, address):
    if sock.family == getattr(socket, "AF_UNIX", None) or not isinstance(address, tuple):
        return True
    return _local(address[0])


def connect(self, address):
    if not _address_ok(self, address):
        _refuse("connect", address[0], address[1])
    return _connect(self, address)


def connect_ex(self, address):
    if not _address_ok(self, address):
        _refuse("connect", address[0], address[1])
    return _connect_ex(self, address)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
'''


class OfflineError(UserError):
    """Something tried the network (or failed) in the offline check; the message names it."""


@dataclass
class OfflineRun:
    command: list[str]
    returncode: int
    output: str


@dataclass
class OfflineReport:
    isolation: str  # how the network was cut
    runs: list[OfflineRun] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)  # network attempts the guard refused

    @property
    def ok(self) -> bool:
        return not self.attempts and all(r.returncode == 0 for r in self.runs)


def namespace_prefix() -> tuple[list[str], str]:
    """The ``unshare`` words that start a child with only loopback, or ``([], why not)``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return [], "no unshare command: Python-level guard only"
    up = "ip link set lo up 2>/dev/null || true; exec \"$@\""  # loopback is down in a new namespace
    for flags in (["-n"], ["-rn"]):
        probe = subprocess.run([unshare, *flags, "true"], capture_output=True)
        if probe.returncode == 0:
            return [unshare, *flags, "sh", "-c", up, "sh"], f"network namespace with loopback only (unshare {' '.join(flags)})"
    return [], "cannot create a network namespace here (no root, no user namespaces): Python-level guard only"


def run_offline(commands: Sequence[Sequence[str]], *, env: Optional[dict] = None, cwd: Optional[Path] = None,
                timeout: float = 1800, isolate: bool = True) -> OfflineReport:
    """Run each command with the network cut; collect exit codes, output and refused attempts."""
    prefix, isolation = namespace_prefix() if isolate else ([], "Python-level guard only (asked)")
    report = OfflineReport(isolation=isolation)
    with tempfile.TemporaryDirectory(prefix="affinage-offline-") as tmp:
        guard = Path(tmp) / "guard"
        guard.mkdir()
        (guard / "sitecustomize.py").write_text(GUARD, encoding="utf-8")
        log = Path(tmp) / "attempts.jsonl"
        child = dict(os.environ if env is None else env)
        child.update(OFFLINE_ENV)
        child[LOG_ENV] = str(log)
        child["PYTHONPATH"] = os.pathsep.join(p for p in (str(guard), child.get("PYTHONPATH", "")) if p)
        for p in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
            child.pop(p, None)
        for command in commands:
            proc = subprocess.run([*prefix, *command], env=child, cwd=cwd, capture_output=True, text=True, timeout=timeout)
            report.runs.append(OfflineRun(list(command), proc.returncode, proc.stdout + proc.stderr))
        if log.exists():
            report.attempts = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return report


def check_offline(recipe: str | os.PathLike, *, steps: int = 2, overrides: Sequence[str] = (), isolate: bool = True,
                  run_dir: Optional[Path] = None) -> OfflineReport:
    """``plan`` then ``smoke`` of ``recipe`` with no network; raises :class:`OfflineError` naming what failed."""
    recipe = Path(recipe).resolve()
    if not recipe.is_file():
        raise OfflineError(f"{recipe}: no such recipe file (stage it first: affinage stage RECIPE --to DIR)")
    sets = [a for o in overrides for a in ("--set", o)]
    with tempfile.TemporaryDirectory(prefix="affinage-offline-smoke-") as tmp:
        smoke_dir = Path(run_dir) if run_dir else Path(tmp) / "smoke"
        py = [sys.executable, "-m", "affinage.cli"]
        report = run_offline(
            [[*py, "plan", str(recipe), *sets], [*py, "smoke", str(recipe), *sets, "--steps", str(steps), "--run-dir", str(smoke_dir)]],
            isolate=isolate,
        )
    problems = []
    for a in report.attempts:
        stage = "plan" if "plan" in a.get("argv", []) else "smoke" if "smoke" in a.get("argv", []) else " ".join(a.get("argv", []))
        problems.append(f"{stage}: {a['what']} of {a['host']}:{a['port']} from {a['where']}")
    for run in report.runs:
        if run.returncode != 0:
            tail = "\n".join(run.output.strip().splitlines()[-6:])
            problems.append(f"`affinage {run.command[3]}` exited {run.returncode}:\n{tail}")
    if problems:
        raise OfflineError(
            f"{recipe} is not usable offline ({report.isolation}):\n" + "\n".join(f"  - {p}" for p in problems)
            + "\nStage what it names (affinage stage RECIPE --to DIR, on a node with internet) and check the staged recipe."
        )
    return report


def format_report(recipe, report: OfflineReport) -> str:
    lines = [f"offline check   {recipe}", f"isolation       {report.isolation}"]
    for run in report.runs:
        lines.append(f"  {run.command[3]:<10} exit {run.returncode}")
    lines.append("result          no network access attempted; plan and smoke passed")
    return "\n".join(lines)
