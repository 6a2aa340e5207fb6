"""The data sources of a run as the manifest describes them: licence, origin, sidecars, language, domains."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from affinage.errors import UserError
from affinage.hashing import FileHasher
from affinage.provenance.language import shares
from affinage.provenance.files import Hasher

SIDECAR_SUFFIXES = (".provenance.yaml", ".provenance.yml", ".provenance.json")
LANGUAGE_SAMPLE_RECORDS = 2000
_URL = re.compile(r"https?://[^\s\"'<>)]+")

SCHEMA = "affinage.provenance/1"
PROVENANCE_FILE = "provenance.json"
SIDECAR_SUFFIXES = (".provenance.yaml", ".provenance.yml", ".provenance.json")
LANGUAGE_SAMPLE_RECORDS = 2000
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "trl", "accelerate", "datasets", "safetensors",
             "bitsandbytes", "deepspeed", "numpy", "pydantic", "lm_eval", "matplotlib")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_URL = re.compile(r"https?://[^\s\"'<>)]+")



def find_sidecar(path: Path) -> Optional[Path]:
    """``<file>.provenance.yaml`` (or .yml/.json) next to a file; for a folder also ``<folder>/provenance.yaml``."""
    candidates = [path.with_name(path.name + s) for s in SIDECAR_SUFFIXES]
    if path.is_dir():
        candidates += [path / ("provenance" + s.split(".provenance")[1]) for s in SIDECAR_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def read_sidecar(path: Path) -> dict:
    import yaml

    from affinage.recipe.problems import validate
    from affinage.recipe.schema import SourceCardSpec

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read this provenance sidecar ({e})") from None
    if isinstance(data, dict) and "license" in data and "licence" not in data:
        data["licence"] = data.pop("license")
    card = validate(SourceCardSpec, data, file=path, hint="A provenance sidecar's keys: licence, origin, category, description, domains, opt_out, collected")
    return card.model_dump(exclude_none=True)


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
    from affinage.data.mixture import source_names
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
                         sha256=FileHasher().maybe(path), hash_from="computed (sorted relative paths and file hashes)")
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
            if st.get("kind") == "preference":  # preference pairs (dpo/kto): a kind of data of its own
                entry["data_kind"] = "preference"
                entry["records"]["train_weighted"] = tr.get("samples")
                entry["pairs"] = {"train": tr.get("samples"), "heldout": he.get("samples"),
                                  "prompt_truncated": tr.get("prompt_truncated"), "completion_truncated": tr.get("completion_truncated"),
                                  "dropped_too_long": tr.get("dropped_too_long")}
        out.append(entry)
    return out
