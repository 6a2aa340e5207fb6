"""The base model of a run: id, revision, resolved folder, file hashes, and its lineage through other runs."""

from __future__ import annotations

import json
import re
from typing import Any

from affinage.hashing import FileHasher
from affinage.provenance import compute as compute_mod
from affinage.provenance.files import Hasher

PROVENANCE_FILE = "provenance.json"  # RUN_DIR/provenance.json (what a later run reads of its base)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

SCHEMA = "affinage.provenance/1"
PROVENANCE_FILE = "provenance.json"
SIDECAR_SUFFIXES = (".provenance.yaml", ".provenance.yml", ".provenance.json")
LANGUAGE_SAMPLE_RECORDS = 2000
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "trl", "accelerate", "datasets", "safetensors",
             "bitsandbytes", "deepspeed", "numpy", "pydantic", "lm_eval", "matplotlib")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_URL = re.compile(r"https?://[^\s\"'<>)]+")



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
                "provenance_sha256": FileHasher().maybe(parent / PROVENANCE_FILE),
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
