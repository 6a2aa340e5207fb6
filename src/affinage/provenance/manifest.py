"""The provenance manifest of a run (``provenance.json``): what was trained, on what, with what.

For every run it records

* each **data source**: path, sha256, size, licence and origin (from the recipe, else the
  recipe's ``card.sources``, else a sidecar file ``<source>.provenance.yaml``, else the records'
  own ``license``/``licence`` fields), a flag when no licence is known, records and tokens used
  after filters (from ``data_stats.json``), the language share, and web domains when records
  carry URLs;
* the **base model**: id, revision, resolved folder and commit, file hashes, parameters, and its
  lineage when it is the output of another affinage run;
* the **resolved recipe** (and the sha256 of ``recipe.yaml``), the **outputs** (``final/``,
  ``merged/`` file hashes);
* the **software** (affinage version and git commit, Python, library versions), the
  **hardware** (recorded by the training process), the **compute** (tokens, parameters,
  training FLOPs, device-hours) and the **energy** estimate;
* the **AI Act compute check** (``affinage.provenance.compute``).

Hashes of large files are reused from the previous manifest when size and modification time are
unchanged, and read from the Hugging Face cache's blob names when possible, so regenerating the
card of a 7B run does not re-read 15 GB. Nothing from the environment is written except what is
listed here, and every string is scrubbed of secrets (``affinage.scrub``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from affinage.errors import UserError
from affinage.eval.sets import file_sha256
from affinage.provenance import compute as compute_mod
from affinage.provenance import energy as energy_mod
from affinage.provenance.language import shares

SCHEMA = "affinage.provenance/1"
PROVENANCE_FILE = "provenance.json"
SIDECAR_SUFFIXES = (".provenance.yaml", ".provenance.yml", ".provenance.json")
LANGUAGE_SAMPLE_RECORDS = 2000
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "trl", "accelerate", "datasets", "safetensors",
             "bitsandbytes", "deepspeed", "numpy", "pydantic", "lm_eval", "matplotlib")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_URL = re.compile(r"https?://[^\s\"'<>)]+")


# ------------------------------------------------------------------------------------- hashing
class Hasher:
    """sha256 of files, reusing known hashes (previous manifest, HF cache blob names)."""

    def __init__(self, previous: Optional[dict] = None):
        self.known: dict[str, tuple[int, int, str]] = {}
        for entry in _walk_file_entries(previous or {}):
            if all(k in entry for k in ("path", "bytes", "mtime_ns", "sha256")) and entry["sha256"]:
                self.known[entry["path"]] = (entry["bytes"], entry["mtime_ns"], entry["sha256"])

    def file(self, path: Path) -> dict:
        path = Path(path)
        st = path.stat()
        key = str(path.absolute())
        entry = {"name": path.name, "path": key, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        target = path.resolve()
        if path.is_symlink() and _HEX64.match(target.name):
            entry.update(sha256=target.name, hash_from="Hugging Face cache blob name")
        elif key in self.known and self.known[key][:2] == (st.st_size, st.st_mtime_ns):
            entry.update(sha256=self.known[key][2], hash_from="previous manifest (same size and time)")
        else:
            entry.update(sha256=file_sha256(path), hash_from="computed")
        return entry

    def folder(self, folder: Path, skip: tuple[str, ...] = ()) -> list[dict]:
        return [self.file(p) for p in sorted(Path(folder).iterdir())
                if p.is_file() and not p.name.startswith(".") and p.name not in skip]


def _walk_file_entries(data: Any):
    if isinstance(data, dict):
        if "sha256" in data and "path" in data:
            yield data
        for v in data.values():
            yield from _walk_file_entries(v)
    elif isinstance(data, list):
        for v in data:
            yield from _walk_file_entries(v)


# ------------------------------------------------------------------------------------- sources
def find_sidecar(path: Path) -> Optional[Path]:
    """``<file>.provenance.yaml`` (or .yml/.json) next to a file; for a folder also ``<folder>/provenance.yaml``."""
    candidates = [path.with_name(path.name + s) for s in SIDECAR_SUFFIXES]
    if path.is_dir():
        candidates += [path / ("provenance" + s.split(".provenance")[1]) for s in SIDECAR_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def read_sidecar(path: Path) -> dict:
    import yaml
    from pydantic import ValidationError

    from affinage.recipe.schema import SourceCardSpec

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read this provenance sidecar ({e})") from None
    if isinstance(data, dict) and "license" in data and "licence" not in data:
        data["licence"] = data.pop("license")
    try:
        return SourceCardSpec.model_validate(data).model_dump(exclude_none=True)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise UserError(f"{path}: {problems}. Keys: licence, origin, category, description, domains, opt_out, collected") from None


def _record_text(data: dict, spec) -> str:
    text = data.get(spec.text_field)
    if isinstance(text, str):
        return text
    msgs = data.get(spec.messages_field)
    if isinstance(msgs, list):
        return "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
    return "\n".join(str(v) for k, v in data.items() if isinstance(v, str) and k not in ("source", "license", "licence", "url"))


def sample_source(spec, limit: int = LANGUAGE_SAMPLE_RECORDS) -> dict:
    """Language share, licences written in the records, and URL domains, on the first ``limit`` records."""
    from affinage.data.readers import read_source

    texts, licences, domains = [], Counter(), Counter()
    n = 0
    try:
        for rec in read_source(spec, on_bad_record="skip"):
            d = rec.data
            texts.append(_record_text(d, spec))
            for key in ("license", "licence", "License"):
                if isinstance(d.get(key), str) and d[key].strip():
                    licences[d[key].strip()] += 1
            for key in ("url", "source", "link", "origin"):
                v = d.get(key)
                if isinstance(v, str):
                    for u in _URL.findall(v):
                        host = urlparse(u).hostname
                        if host:
                            domains[host.removeprefix("www.")] += 1
            n += 1
            if n >= limit:
                break
    except Exception as e:  # an unreadable source is reported, never hidden
        return {"error": f"{type(e).__name__}: {e}"}
    share, docs, chars = shares(texts)
    return {"records": n, "characters": chars, "language_share": share, "record_licences": dict(licences.most_common(10)),
            "url_domains": dict(domains.most_common(20)), "complete": n < limit}


def describe_sources(recipe, stats: Optional[dict], hasher: Hasher) -> list[dict]:
    from affinage.data.dataset import source_names
    from affinage.data.readers import source_path

    card_sources = (recipe.card.sources if recipe.card else {}) or {}
    stats_sources = (stats or {}).get("sources", {})
    out = []
    for spec, name in zip(recipe.data.sources, source_names(recipe.data.sources)):
        path = source_path(spec)
        entry: dict[str, Any] = {"name": name, "path": spec.path, "resolved_path": str(path.absolute()),
                                 "format": spec.format, "weight": spec.weight, "exists": path.exists()}
        if path.is_file():
            f = hasher.file(path)
            entry.update(kind="file", sha256=f["sha256"], bytes=f["bytes"], mtime_ns=f["mtime_ns"], hash_from=f["hash_from"])
        elif path.is_dir():
            files = [p for p in sorted(path.rglob("*")) if p.is_file()]
            entry.update(kind="folder", files=len(files), bytes=sum(p.stat().st_size for p in files),
                         sha256=file_sha256(path), hash_from="computed (sorted relative paths and file hashes)")
        sidecar = find_sidecar(path) if path.exists() else None
        side = read_sidecar(sidecar) if sidecar else {}
        if sidecar:
            entry["sidecar"] = str(sidecar)
        card = card_sources.get(name)
        card = card.model_dump(exclude_none=True) if card is not None else {}
        sample = sample_source(spec) if path.exists() else {"error": "path does not exist"}
        entry["sample"] = sample

        def pick(field: str, recipe_value=None):
            for value, where in ((recipe_value, "recipe (data.sources)"), (card.get(field), "recipe (card.sources)"),
                                 (side.get(field), f"sidecar {sidecar.name if sidecar else ''}")):
                if value:
                    return value, where
            return None, None

        entry["licence"], entry["licence_from"] = pick("licence", spec.licence)
        if not entry["licence"] and sample.get("record_licences"):
            lic = sample["record_licences"]
            entry["licence"] = "; ".join(f"{k} ({v} records)" for k, v in lic.items())
            entry["licence_from"] = "the records' own licence field (sample)"
        entry["origin"], entry["origin_from"] = pick("origin", spec.origin)
        for field in ("category", "description", "opt_out", "collected"):
            entry[field] = pick(field)[0]
        entry["domains"] = card.get("domains") or side.get("domains") or list(sample.get("url_domains", {}))[:10]
        flags = []
        if not entry["licence"]:
            flags.append("no licence: set data.sources[].licence, card.sources, or a sidecar file")
        if not entry["origin"]:
            flags.append("no origin")
        if not entry["exists"]:
            flags.append("path not found now (moved or deleted after training?)")
        entry["flags"] = flags
        st = stats_sources.get(name)
        if st:
            skipped = (st.get("skipped") or {}).get("count", 0)
            kept = st.get("documents_kept", st.get("records_read"))
            entry["records"] = {
                "read": st.get("records_read"),
                "skipped_malformed": skipped,
                "kept_after_filters": kept,
                "filters": {k: v.get("dropped") for k, v in (st.get("filters") or {}).items()},
                "heldout": st.get("heldout_records"),
                "train": st.get("train_records"),
                "train_weighted": st.get("train_records_weighted"),
            }
            tr, he = st.get("train") or {}, st.get("heldout") or {}
            entry["tokens"] = {"train": tr.get("tokens"), "train_with_loss": tr.get("loss_tokens"),
                               "heldout": he.get("tokens")}
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------- base model
def describe_base(recipe, hasher: Hasher) -> dict:
    from affinage.model.resolve import resolve_model_path

    spec = recipe.model
    out: dict[str, Any] = {"name_or_path": spec.name_or_path, "revision": spec.revision, "init": spec.init,
                           "tokenizer": spec.tokenizer, "dtype": spec.dtype}
    if spec.init == "random":
        out["seed"] = recipe.seed
    try:
        path = resolve_model_path(spec.name_or_path, revision=spec.revision, mirrors=spec.mirrors)
    except Exception as e:
        out["resolved_path"] = None
        out["note"] = f"not found on this machine now: {str(e).splitlines()[0]}"
        return out
    out["resolved_path"] = str(path)
    if path.parent.name == "snapshots" and _COMMIT.match(path.name):
        out["commit"] = path.name
    cfg = path / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text(encoding="utf-8"))
        out["model_type"] = c.get("model_type")
        out["architectures"] = c.get("architectures")
    out["files"] = hasher.folder(path, skip=("README.md",))
    params = None if spec.init == "random" else compute_mod.safetensors_parameters(path)
    out["parameters"] = params or compute_mod.config_parameters(path, spec.trust_remote_code)
    parent = path.parent
    if path.name in ("final", "merged") and (parent / PROVENANCE_FILE).is_file():
        try:
            up = json.loads((parent / PROVENANCE_FILE).read_text(encoding="utf-8"))
            out["lineage"] = {
                "run": up.get("run", {}).get("name"),
                "run_dir": str(parent),
                "provenance": str(parent / PROVENANCE_FILE),
                "provenance_sha256": file_sha256(parent / PROVENANCE_FILE),
                "training_flops": (up.get("compute") or {}).get("flops"),
                "base_training_flops": ((up.get("ai_act") or {}).get("compute_check") or {}).get("base_flops"),
                "base_model": (up.get("base_model") or {}).get("name_or_path"),
                "base_init": (up.get("base_model") or {}).get("init"),
                "sources": [{"name": s.get("name"), "licence": s.get("licence"), "sha256": s.get("sha256")}
                            for s in up.get("sources", [])],
            }
        except (OSError, ValueError):
            pass
    return out


# -------------------------------------------------------------------------------- software etc.
def git_info(start: Optional[Path] = None) -> dict:
    """Commit of the affinage checkout (when it is one) and whether it has uncommitted changes."""
    import affinage

    folder = start or Path(affinage.__file__).resolve().parents[2]
    if not (folder / ".git").exists():
        return {"commit": None, "note": "affinage is not installed from a git checkout"}
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

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
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
    from affinage.run import RunDir

    jobs = RunDir(run_root).jobs
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


# ------------------------------------------------------------------------------------- manifest
def build_manifest(recipe, run, result=None, *, training_process: bool = True, previous: Optional[dict] = None) -> dict:
    """The manifest dict for ``run`` (a RunDir) trained from ``recipe``; see the module docstring."""
    if previous is None and run.provenance.is_file():
        try:
            previous = json.loads(run.provenance.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
    hasher = Hasher(previous)
    summary = result.as_dict() if result is not None else (run.read_summary() if run.summary.is_file() else {})
    stats = json.loads(run.data_stats.read_text(encoding="utf-8")) if run.data_stats.is_file() else None
    metrics = run.read_metrics()

    sources = describe_sources(recipe, stats, hasher)
    base = describe_base(recipe, hasher)
    outputs = {}
    for label, folder in (("final", run.final), ("merged", run.merged)):
        if folder.is_dir():
            outputs[label] = {"path": str(folder), "files": hasher.folder(folder, skip=("README.md",))}

    if training_process:
        hw = hardware(summary.get("world_size"))
    elif previous and previous.get("hardware"):
        hw = previous["hardware"]
    else:
        hw = {"recorded_by": None, "note": "not recorded: the card was generated outside the training process",
              "device_kind": None, "gpus": []}

    tokens = None
    for row in metrics:
        if isinstance(row.get("num_input_tokens_seen"), (int, float)):
            tokens = int(row["num_input_tokens_seen"])
    if tokens is None and summary.get("tokens_seen"):
        tokens = int(summary["tokens_seen"])
    trainer_flos = next((row["total_flos"] for row in reversed(metrics) if "total_flos" in row), None)
    seconds, sessions = training_time(metrics)
    params = base.get("parameters")
    flops, formula = (compute_mod.training_flops(params, tokens, recipe.method.kind, recipe.training.gradient_checkpointing)
                      if params and tokens else (None, None))
    kind = hw.get("device_kind")
    devices = (summary.get("world_size") or 1) if kind == "gpu" else 1
    compute = {"tokens_trained": tokens, "parameters": params, "method": recipe.method.kind, "flops": flops,
               "flops_formula": formula, "trainer_total_flos": trainer_flos, "train_seconds": seconds,
               "sessions": sessions, "device_kind": kind, "devices": devices,
               "gpu_hours": seconds * devices / 3600 if (seconds is not None and kind == "gpu") else (0.0 if kind == "cpu" else None),
               "wall_seconds_last_session": summary.get("seconds")}

    card = recipe.card
    profile = cluster_profile(run.root)
    gpu_name = (hw.get("gpus") or [{}])[0].get("name") if hw.get("gpus") else None
    energy = energy_mod.estimate(
        device_seconds=seconds if kind else None, devices=devices, device_kind=kind or "cpu", device_name=gpu_name,
        cpu_cores=hw.get("cpu_cores_visible"),
        power_w=(card.gpu_power_w if card and card.gpu_power_w else getattr(profile, "gpu_power_w", None)),
        pue=(card.pue if card and card.pue else getattr(profile, "pue", None)),
        grid_gco2_per_kwh=card.grid_gco2_per_kwh if card else None, location=card.location if card else "France",
    )
    if profile is not None:
        energy["cluster_profile"] = profile.name
    if not kind:
        energy["summary"] = "hardware not recorded (provenance written outside the training process)"

    lineage = base.get("lineage")
    declared = card.base_model_training_flops if card else None
    if declared is None and lineage and lineage.get("training_flops") is not None:
        declared = lineage["training_flops"] + (lineage.get("base_training_flops") or 0)
    check = compute_mod.compute_check(flops, base.get("name_or_path") or "", init=recipe.model.init, declared=declared)
    if lineage and not (card and card.base_model_training_flops is not None) and declared is not None:
        check["base_flops_source"] = (f"lineage: training compute recorded in {shown(lineage['provenance'])} "
                                      "(plus its own base's, when known)")
    if lineage:
        check["note"] = (f"the base model is the output of the affinage run {lineage['run']}: whoever trained it is "
                         "already the provider of that model")

    import yaml

    from affinage.recipe.loader import dump_resolved

    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    eval_file = run.eval_results
    return {
        "schema": SCHEMA,
        "created": created,
        "run": {"name": recipe.name, "description": recipe.description, "task": recipe.task, "method": recipe.method.kind,
                "run_dir": str(run.root), "completed": summary.get("completed"), "steps": summary.get("steps"),
                "max_steps": summary.get("max_steps")},
        "recipe": {"file": str(run.recipe), "sha256": file_sha256(run.recipe),
                   "resolved": yaml.safe_load(dump_resolved(recipe))},
        "sources": sources,
        "totals": _totals(sources),
        "base_model": base,
        "outputs": outputs,
        "software": software(),
        "hardware": hw,
        "compute": compute,
        "energy": energy,
        "ai_act": {"compute_check": check},
        "evaluation": {"results": str(eval_file), "sha256": file_sha256(eval_file)} if eval_file.is_file() else None,
        "identity": run.read_identity(),  # what the run trains, and the changes allowed on resume (step, key, from, to)
    }


def shown(path: str) -> str:
    """A path as a reader would type it: relative to the current directory when under it."""
    p, cwd = Path(path), Path.cwd()
    return str(p.relative_to(cwd)) if p.is_absolute() and p.is_relative_to(cwd) else str(path)


def _totals(sources: list[dict]) -> dict:
    t = {"records_train": 0, "tokens_train": 0, "sources": len(sources),
         "sources_without_licence": [s["name"] for s in sources if not s.get("licence")]}
    chars: Counter = Counter()
    for s in sources:
        t["records_train"] += (s.get("records") or {}).get("train_weighted") or 0
        t["tokens_train"] += (s.get("tokens") or {}).get("train") or 0
        samp = s.get("sample") or {}
        for lang, share in (samp.get("language_share") or {}).items():
            chars[lang] += share * (samp.get("characters") or 0)
    total = sum(chars.values())
    t["language_share"] = {k: round(v / total, 4) for k, v in chars.most_common()} if total else {}
    return t
