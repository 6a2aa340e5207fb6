"""``affinage eval``: the same tasks on the base and the fine-tuned model, then the differences.

Outputs (under the run directory, or ``--out`` for a plain model folder)::

    eval/results.json    settings, per-model figures, differences with bootstrap intervals
    eval/details.jsonl   one line per document / item / prompt and model (to check any number)
    eval/*.png           plots used by the report
    report.md            the readable report (training curves when it is a run, and these results)

The base is evaluated first, then the tuned model, one model in memory at a time.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from affinage.errors import UserError
from affinage.eval import harness, mcq, perplexity, preference
from affinage.eval.generation import generate
from affinage.eval.models import (Target, context_length, default_device, eval_dtype, load,
                                  resolve_target, unload)
from affinage.eval.sets import read_mcq, read_prompts, read_text_set
from affinage.eval.specs import NO_SPEC, combine, select
from affinage.eval.results import write_results
from affinage.hashing import FileHasher
from affinage.paths import expand
from affinage.eval.stats import mean_ci, paired_mean_delta, paired_ratio_delta, ratio_ci
from affinage.recipe.schema import EvalSpec, McqSetSpec, PerplexitySetSpec
from affinage.model.load import count_parameters

ROLES = ("base", "tuned")

@dataclass
class _Data:
    texts: dict[str, list[str]] = field(default_factory=dict)
    groups: dict[str, Optional[list[str]]] = field(default_factory=dict)
    items: dict[str, list] = field(default_factory=dict)
    pools: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    pairs: Optional[list] = None  # held-out preference pairs of a dpo/kto run (eval.preference)


def _read_data(spec: EvalSpec, limit: Optional[int]) -> _Data:
    d = _Data()
    for s in spec.perplexity:
        n = min(x for x in (s.max_records, limit) if x) if (s.max_records or limit) else None
        text_set = read_text_set(s.path, s.text_field, n, group_field=s.group_field)
        d.texts[s.name], d.groups[s.name] = text_set.texts, text_set.groups
    for s in spec.mcq:
        n = min(x for x in (s.max_items, limit) if x) if (s.max_items or limit) else None
        fields = {"question_field": s.question_field, "choices_field": s.choices_field, "answer_field": s.answer_field}
        d.items[s.name] = read_mcq(s.path, n, group_field=s.group_field, **fields)
        d.groups[s.name] = [it.group for it in d.items[s.name]] if s.group_field else None
        d.pools[s.name] = read_mcq(s.fewshot_path, **fields) if s.fewshot_path else None
    if spec.generation:
        d.prompts = read_prompts(spec.generation.prompts, spec.generation.path)
        if limit:
            d.prompts = d.prompts[:limit]
    return d


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"affinage eval: {text}", flush=True)


def _evaluate_one(loaded, spec: EvalSpec, data: _Data, *, max_length: int, batch_size: int, device: str,
                  limit: Optional[int], progress: bool, role: str) -> dict:
    out: dict[str, Any] = {"perplexity": {}, "mcq": {}, "generation": [], "lm_eval": None}
    for s in spec.perplexity:
        t0 = time.monotonic()
        scores = perplexity.score_texts(loaded.model, loaded.tokenizer, data.texts[s.name], max_length=max_length,
                                        batch_size=batch_size)
        out["perplexity"][s.name] = scores
        agg = perplexity.aggregate(scores)
        _say(progress, f"{role:<5} perplexity {s.name}: {agg['bits_per_byte']:.4f} bits/byte, "
                       f"token perplexity {agg['token_perplexity']:.2f} ({time.monotonic() - t0:.1f} s)")
    for s in spec.mcq:
        t0 = time.monotonic()
        per_item = mcq.score_items(loaded.model, loaded.tokenizer, data.items[s.name], template=s.template,
                                   num_fewshot=s.num_fewshot, pool=data.pools[s.name], max_length=max_length,
                                   batch_size=batch_size, seed=spec.seed, set_name=s.name)
        out["mcq"][s.name] = per_item
        agg = mcq.aggregate(per_item)
        _say(progress, f"{role:<5} mcq {s.name}: acc {agg['acc']:.3f}, acc_norm {agg['acc_norm']:.3f} "
                       f"({agg['items']} items, {time.monotonic() - t0:.1f} s)")
    if spec.generation and data.prompts:
        out["generation"] = generate(loaded.model, loaded.tokenizer, data.prompts,
                                     max_new_tokens=spec.generation.max_new_tokens, seed=spec.seed, max_length=max_length)
        _say(progress, f"{role:<5} generation: {len(data.prompts)} prompts")
    if data.pairs:
        out["preference"] = preference.score_pairs(loaded.model, loaded.tokenizer, data.pairs, batch_size=batch_size, device=device)
        _say(progress, f"{role:<5} preference: {len(data.pairs)} held-out pairs")
    if spec.lm_eval:
        if not harness.available():
            out["lm_eval"] = {"skipped": harness.MISSING}
        else:
            out["lm_eval"] = harness.run(loaded.model, loaded.tokenizer, spec.lm_eval, batch_size=batch_size,
                                         max_length=max_length, device=device, limit=limit, seed=spec.seed)
    return out


def _grouping(s, groups: Optional[list[str]]) -> dict:
    return {"group_field": s.group_field, "groups": len(set(groups))} if groups is not None else {}


def _ppl_entry(s: PerplexitySetSpec, texts, groups, raw: dict, spec: EvalSpec) -> dict:
    entry: dict[str, Any] = {"name": s.name, "path": str(expand(s.path)), "sha256": FileHasher().maybe(expand(s.path)),
                             "role": s.role, "documents": len(texts), **_grouping(s, groups)}
    ln2 = math.log(2)
    boot = {"groups": groups, "iterations": spec.bootstrap, "confidence": spec.confidence, "seed": spec.seed}
    for role, scores in raw.items():
        agg = perplexity.aggregate(scores)
        agg["bits_per_byte_ci"] = ratio_ci([x.nll for x in scores], [x.bytes for x in scores], scale=1 / ln2, **boot)
        entry[role] = agg
    if "base" in raw and "tuned" in raw:
        a, b = raw["base"], raw["tuned"]
        entry["delta"] = {"bits_per_byte": paired_ratio_delta(
            [x.nll for x in a], [x.nll for x in b], [x.bytes for x in a], scale=1 / ln2, **boot)}
    return entry


def _mcq_entry(s: McqSetSpec, items, groups, raw: dict, spec: EvalSpec) -> dict:
    entry: dict[str, Any] = {"name": s.name, "path": str(expand(s.path)), "sha256": FileHasher().maybe(expand(s.path)),
                             "role": s.role, "items": len(items), "num_fewshot": s.num_fewshot, "template": s.template,
                             "chance": sum(1 / len(it.choices) for it in items) / len(items), **_grouping(s, groups)}
    boot = {"groups": groups, "iterations": spec.bootstrap, "confidence": spec.confidence, "seed": spec.seed}
    for role, per_item in raw.items():
        agg = mcq.aggregate(per_item)
        for m in ("acc", "acc_norm"):
            agg[f"{m}_ci"] = mean_ci([r[m] for r in per_item], **boot)
        entry[role] = agg
    if "base" in raw and "tuned" in raw:
        entry["delta"] = {m: paired_mean_delta([r[m] for r in raw["base"]], [r[m] for r in raw["tuned"]], **boot)
                          for m in ("acc", "acc_norm", "acc_norm_bytes")}
    return entry


def _lm_eval_entry(raw: dict, spec: EvalSpec) -> dict:
    if any(r and "skipped" in r for r in raw.values()):
        return {"skipped": harness.MISSING, "tasks": list(spec.lm_eval.tasks)}
    entry: dict[str, Any] = {"tasks": {}}
    for role, res in raw.items():
        for task, t in (res or {}).get("tasks", {}).items():
            entry["tasks"].setdefault(task, {})[role] = {k: v for k, v in t.items() if k != "per_doc"}
    if "base" in raw and "tuned" in raw:
        for task, both in entry["tasks"].items():
            a = raw["base"]["tasks"].get(task, {}).get("per_doc", {})
            b = raw["tuned"]["tasks"].get(task, {}).get("per_doc", {})
            deltas = {}
            for m in set(a) & set(b):
                if len(a[m]) == len(b[m]) and a[m]:
                    deltas[m] = paired_mean_delta(a[m], b[m], iterations=spec.bootstrap, confidence=spec.confidence,
                                                  seed=spec.seed)
            if deltas:
                both["delta"] = deltas
    return entry


def run_eval(target, *, spec: Optional[EvalSpec] = None, tasks: Optional[Sequence[str]] = None,
             base: Optional[str] = None, compare_base: Optional[bool] = None, out_dir=None,
             limit: Optional[int] = None, batch_size: Optional[int] = None, device: Optional[str] = None,
             progress: bool = True, write: bool = True, extra: Optional[EvalSpec] = None, replace: bool = False,
             overrides: Sequence[str] = ()) -> dict:
    """Evaluate ``target`` (run dir, model folder or offline id) and write ``eval/results.json``; returns the results.

    The report and model card are written from those files by ``affinage.evaluate`` (eval never
    imports provenance).
    """
    start = time.monotonic()
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give a number of records per set of at least 1 (or leave it out for all)")
    probe = expand(target)
    if not probe.exists() and (os.sep in str(target) or str(target).startswith(".")):
        raise UserError(f"{target}: no such run directory or model folder (looked at {probe.absolute()})")
    recipe_spec = None
    if (probe / "recipe.yaml").is_file():
        from affinage.recipe.loader import load_recipe

        run_recipe = load_recipe(probe / "recipe.yaml", overrides=overrides)
        recipe_spec = run_recipe.eval
        if recipe_spec is None and preference.is_preference_run(run_recipe):
            recipe_spec = EvalSpec()  # a preference run always has its held-out pairs to score
    elif overrides:
        raise UserError(f"--set applies to a run's recipe ({target} has no recipe.yaml): give the eval sets with "
                        "--spec FILE or --ppl/--mcq NAME=PATH,key=value")
    spec = combine(spec or recipe_spec, extra, replace)
    if spec is None:
        raise UserError(NO_SPEC)
    spec = select(spec, tasks)
    compare = spec.compare_base if compare_base is None else compare_base
    t: Target = resolve_target(target, base=base, compare_base=compare, spec_base=spec.base)
    if t.run is not None and preference.is_preference_run(t.recipe):
        preference.preference_target(t, base or spec.base, compare)  # aligned model vs the start of the stage
    for note in t.notes:
        _say(progress, note)
    root = Path(out_dir) if out_dir else (t.root if t.run is not None else Path.cwd() / f"eval-{t.root.name}")
    device = device or default_device()
    bs = batch_size or spec.batch_size
    data = _read_data(spec, limit)
    data.pairs = preference.heldout_pairs(t, limit)

    refs = ([("base", t.base)] if t.base is not None else []) + [("tuned", t.tuned)]
    raw: dict[str, dict] = {}
    models: dict[str, dict] = {}
    max_length = spec.max_length or (t.recipe.data.max_length if t.recipe is not None else None)
    kept_base = None
    for role, ref in refs:
        reuse = kept_base if (role == "tuned" and kept_base is not None and ref.adapter is not None
                              and t.base is not None and ref.same_base(t.base)) else None
        _say(progress, f"loading {ref.description} on {device}")
        loaded = load(ref, device=device, reuse_base=reuse)
        if max_length is None:
            max_length = context_length(loaded.model)
        models[role] = {"description": ref.description, "name_or_path": ref.spec.name_or_path,
                        "adapter": str(ref.adapter) if ref.adapter else None,
                        "random_init_seed": ref.seed, "parameters": count_parameters(loaded.model)[0]}
        raw[role] = _evaluate_one(loaded, spec, data, max_length=max_length, batch_size=bs, device=device,
                                  limit=limit, progress=progress, role=role)
        if role == "base" and t.tuned.adapter is not None and t.tuned.same_base(ref) and not spec.lm_eval:
            kept_base = loaded.model  # the adapter goes on this very model next
        del loaded
        unload()

    import affinage
    import torch

    results: dict[str, Any] = {
        "schema": "affinage.eval/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "affinage_version": affinage.__version__,
        "target": str(t.root),
        "run": t.recipe.name if t.recipe is not None else None,
        "models": models,
        "settings": {"max_length": max_length, "batch_size": bs, "device": device,
                     "dtype": str(eval_dtype(device)).replace("torch.", ""),
                     "bootstrap": spec.bootstrap, "confidence": spec.confidence, "seed": spec.seed, "limit": limit,
                     "torch": torch.__version__},
        "perplexity": [_ppl_entry(s, data.texts[s.name], data.groups[s.name], {r: raw[r]["perplexity"][s.name] for r in raw},
                                  spec) for s in spec.perplexity],
        "mcq": [_mcq_entry(s, data.items[s.name], data.groups[s.name], {r: raw[r]["mcq"][s.name] for r in raw}, spec)
                for s in spec.mcq],
        "generation": [{"prompt": p, **{r: raw[r]["generation"][i] for r in raw}} for i, p in enumerate(data.prompts)]
        if spec.generation else [],
        "lm_eval": _lm_eval_entry({r: raw[r]["lm_eval"] for r in raw}, spec) if spec.lm_eval else None,
        "notes": t.notes,
    }
    if data.pairs is not None:
        beta = t.recipe.preference.beta if t.recipe.preference else 0.1
        results["preference"] = preference.preference_entry({r: raw[r].get("preference", []) for r in raw}, beta=beta,
                                                            bootstrap=spec.bootstrap, confidence=spec.confidence, seed=spec.seed)
    results["seconds"] = round(time.monotonic() - start, 2)
    if write:
        write_results(root, results, raw, data, spec)
    results["_root"] = str(root)
    results["_run_dir"] = str(t.root) if t.run is not None else None
    return results
