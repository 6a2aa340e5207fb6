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
listed here, and every string is scrubbed of secrets (``affinage.provenance.secrets``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from affinage.hashing import FileHasher
from affinage.provenance import compute as compute_mod
from affinage.provenance import energy as energy_mod
from affinage.provenance.environment import cluster_profile, hardware, software, training_time
from affinage.provenance.files import Hasher
from affinage.provenance.lineage import PROVENANCE_FILE, describe_base
from affinage.provenance.sources import describe_sources

SCHEMA = "affinage.provenance/1"


# ------------------------------------------------------------------------------------- manifest
def build_manifest(recipe, run, result=None, *, training_process: bool = True, previous: Optional[dict] = None) -> dict:
    """The manifest dict for ``run`` (a RunDir) trained from ``recipe``; see the module docstring."""
    if previous is None and (run.root / PROVENANCE_FILE).is_file():
        try:
            previous = json.loads((run.root / PROVENANCE_FILE).read_text(encoding="utf-8"))
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
    eval_file = run.root / "eval" / "results.json"
    return {
        "schema": SCHEMA,
        "created": created,
        "run": {"name": recipe.name, "description": recipe.description, "task": recipe.task, "method": recipe.method.kind,
                "run_dir": str(run.root), "completed": summary.get("completed"), "steps": summary.get("steps"),
                "max_steps": summary.get("max_steps")},
        "recipe": {"file": str(run.recipe), "sha256": FileHasher().maybe(run.recipe),
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
        "evaluation": {"results": str(eval_file), "sha256": FileHasher().maybe(eval_file)} if eval_file.is_file() else None,
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

