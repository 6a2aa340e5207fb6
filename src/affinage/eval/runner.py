"""``affinage eval``: the same tasks on the base and the fine-tuned model, then the differences.

Outputs (under the run directory, or ``--out`` for a plain model folder)::

    eval/results.json    settings, per-model figures, differences with bootstrap intervals
    eval/details.jsonl   one line per document / item / prompt and model (to check any number)
    eval/*.png           plots used by the report
    report.md            the readable report (training curves when it is a run, and these results)

The base is evaluated first, then the tuned model, one model in memory at a time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from affinage.errors import UserError
from affinage.eval import harness, mcq, perplexity
from affinage.eval.generation import generate
from affinage.eval.models import (Target, context_length, count_parameters, default_device, eval_dtype, load,
                                  resolve_target, unload)
from affinage.eval.sets import expand, file_sha256, read_mcq, read_prompts, read_texts
from affinage.eval.stats import mean_ci, paired_mean_delta, paired_ratio_delta, ratio_ci
from affinage.recipe.schema import EvalSpec, GenerationSpec, McqSetSpec, PerplexitySetSpec

KINDS = ("perplexity", "mcq", "generation", "lm_eval")
ROLES = ("base", "tuned")
RESULTS_FILE = "results.json"
DETAILS_FILE = "details.jsonl"

NO_SPEC = (
    "nothing to evaluate: the recipe has no `eval:` section and no --spec/--ppl/--mcq/--prompts was given. "
    "Add for example\n"
    "eval:\n"
    "  perplexity:\n"
    "    - {name: domain-heldout, path: data/heldout.jsonl}\n"
    "    - {name: general, path: data/general.jsonl, role: forgetting}\n"
    "  mcq:\n"
    "    - {name: quiz, path: data/quiz.jsonl, num_fewshot: 3}\n"
    "  generation: {prompts: ['La Constitution de 1958']}\n"
    "to the recipe (or to a YAML file given with --spec)."
)


def eval_dir(root: Path) -> Path:
    from affinage.run import RunDir

    return RunDir(root).eval


def load_spec_file(path: str) -> EvalSpec:
    import yaml
    from pydantic import ValidationError

    p = expand(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise UserError(f"--spec {path}: cannot read ({e.strerror})") from None
    if isinstance(data, dict) and "eval" in data and len(data) == 1:
        data = data["eval"]
    try:
        return EvalSpec.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise UserError(f"--spec {path}: " + "; ".join(lines)) from None


def adhoc_spec(ppl: Sequence[str] = (), forgetting: Sequence[str] = (), mcq_sets: Sequence[str] = (),
               prompts: Optional[str] = None) -> Optional[EvalSpec]:
    """An :class:`EvalSpec` from command-line ``NAME=PATH`` pairs (or bare paths)."""
    def pair(text: str) -> tuple[str, str]:
        name, sep, path = text.partition("=")
        if not sep:
            path, name = text, Path(text).stem
        return name, path

    if not (ppl or forgetting or mcq_sets or prompts):
        return None
    return EvalSpec(
        perplexity=[PerplexitySetSpec(name=n, path=p) for n, p in map(pair, ppl)]
        + [PerplexitySetSpec(name=n, path=p, role="forgetting") for n, p in map(pair, forgetting)],
        mcq=[McqSetSpec(name=n, path=p) for n, p in map(pair, mcq_sets)],
        generation=GenerationSpec(path=prompts) if prompts else None,
    )


def select(spec: EvalSpec, tasks: Optional[Sequence[str]]) -> EvalSpec:
    """Keep the kinds (perplexity, mcq, generation, lm_eval) or set names listed in ``tasks``."""
    if not tasks:
        return spec
    wanted = {t.strip() for t in tasks if t.strip()}
    names = {s.name for s in spec.perplexity} | {s.name for s in spec.mcq}
    unknown = wanted - set(KINDS) - names
    if unknown:
        raise UserError(
            f"--tasks: unknown {', '.join(sorted(unknown))}. Valid: {', '.join(KINDS)}"
            + (f", or set names {', '.join(sorted(names))}" if names else "")
        )
    return spec.model_copy(update={
        "perplexity": [s for s in spec.perplexity if "perplexity" in wanted or s.name in wanted],
        "mcq": [s for s in spec.mcq if "mcq" in wanted or s.name in wanted],
        "generation": spec.generation if "generation" in wanted else None,
        "lm_eval": spec.lm_eval if "lm_eval" in wanted else None,
    })


@dataclass
class _Data:
    texts: dict[str, list[str]] = field(default_factory=dict)
    items: dict[str, list] = field(default_factory=dict)
    pools: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)


def _read_data(spec: EvalSpec, limit: Optional[int]) -> _Data:
    d = _Data()
    for s in spec.perplexity:
        n = min(x for x in (s.max_records, limit) if x) if (s.max_records or limit) else None
        d.texts[s.name] = read_texts(s.path, s.text_field, n)
    for s in spec.mcq:
        n = min(x for x in (s.max_items, limit) if x) if (s.max_items or limit) else None
        d.items[s.name] = read_mcq(s.path, n)
        d.pools[s.name] = read_mcq(s.fewshot_path) if s.fewshot_path else None
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
    if spec.lm_eval:
        if not harness.available():
            out["lm_eval"] = {"skipped": harness.MISSING}
        else:
            out["lm_eval"] = harness.run(loaded.model, loaded.tokenizer, spec.lm_eval, batch_size=batch_size,
                                         max_length=max_length, device=device, limit=limit, seed=spec.seed)
    return out


def _ppl_entry(s: PerplexitySetSpec, texts, raw: dict, spec: EvalSpec) -> dict:
    entry: dict[str, Any] = {"name": s.name, "path": str(expand(s.path)), "sha256": file_sha256(expand(s.path)),
                             "role": s.role, "documents": len(texts)}
    ln2 = math.log(2)
    for role, scores in raw.items():
        agg = perplexity.aggregate(scores)
        agg["bits_per_byte_ci"] = ratio_ci([x.nll for x in scores], [x.bytes for x in scores], scale=1 / ln2,
                                           iterations=spec.bootstrap, confidence=spec.confidence, seed=spec.seed)
        entry[role] = agg
    if "base" in raw and "tuned" in raw:
        a, b = raw["base"], raw["tuned"]
        entry["delta"] = {"bits_per_byte": paired_ratio_delta(
            [x.nll for x in a], [x.nll for x in b], [x.bytes for x in a], scale=1 / ln2,
            iterations=spec.bootstrap, confidence=spec.confidence, seed=spec.seed)}
    return entry


def _mcq_entry(s: McqSetSpec, items, raw: dict, spec: EvalSpec) -> dict:
    entry: dict[str, Any] = {"name": s.name, "path": str(expand(s.path)), "sha256": file_sha256(expand(s.path)),
                             "role": s.role, "items": len(items), "num_fewshot": s.num_fewshot, "template": s.template,
                             "chance": sum(1 / len(it.choices) for it in items) / len(items)}
    for role, per_item in raw.items():
        agg = mcq.aggregate(per_item)
        for m in ("acc", "acc_norm"):
            agg[f"{m}_ci"] = mean_ci([r[m] for r in per_item], iterations=spec.bootstrap, confidence=spec.confidence,
                                     seed=spec.seed)
        entry[role] = agg
    if "base" in raw and "tuned" in raw:
        entry["delta"] = {m: paired_mean_delta([r[m] for r in raw["base"]], [r[m] for r in raw["tuned"]],
                                               iterations=spec.bootstrap, confidence=spec.confidence, seed=spec.seed)
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
             progress: bool = True, write: bool = True) -> dict:
    """Evaluate ``target`` (run dir, model folder or offline id) and write results and report; returns the results."""
    start = time.monotonic()
    probe = Path(str(target))
    recipe_spec = None
    from affinage.run import RunDir

    if RunDir(probe).is_run():
        from affinage.recipe.loader import load_recipe

        recipe_spec = load_recipe(RunDir(probe).recipe).eval
    spec = spec or recipe_spec
    if spec is None:
        raise UserError(NO_SPEC)
    spec = select(spec, tasks)
    compare = spec.compare_base if compare_base is None else compare_base
    t: Target = resolve_target(target, base=base, compare_base=compare, spec_base=spec.base)
    for note in t.notes:
        _say(progress, note)
    root = Path(out_dir) if out_dir else (t.root if t.run is not None else Path.cwd() / f"eval-{t.root.name}")
    device = device or default_device()
    bs = batch_size or spec.batch_size
    data = _read_data(spec, limit)

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
                        "random_init_seed": ref.seed, "parameters": count_parameters(loaded.model)}
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
        "perplexity": [_ppl_entry(s, data.texts[s.name], {r: raw[r]["perplexity"][s.name] for r in raw}, spec)
                       for s in spec.perplexity],
        "mcq": [_mcq_entry(s, data.items[s.name], {r: raw[r]["mcq"][s.name] for r in raw}, spec) for s in spec.mcq],
        "generation": [{"prompt": p, **{r: raw[r]["generation"][i] for r in raw}} for i, p in enumerate(data.prompts)]
        if spec.generation else [],
        "lm_eval": _lm_eval_entry({r: raw[r]["lm_eval"] for r in raw}, spec) if spec.lm_eval else None,
        "notes": t.notes,
    }
    results["seconds"] = round(time.monotonic() - start, 2)
    if write:
        write_results(root, results, raw, data, spec)
        from affinage.eval.report import write_report

        write_report(root, run=t.run, results=results)
        if t.run is not None:
            try:
                from affinage.provenance import write_run_provenance

                write_run_provenance(t.recipe, t.run, training_process=False)
            except Exception as e:  # the card is refreshed on a best-effort basis; `affinage card` says why
                _say(progress, f"could not refresh the model card ({type(e).__name__}: {e}); run affinage card {t.root}")
    results["_root"] = str(root)
    return results


def write_results(root: Path, results: dict, raw: dict, data: _Data, spec: EvalSpec) -> Path:
    from affinage.run import write_json, write_text

    out = eval_dir(root)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for role, r in raw.items():
        for name, scores in r["perplexity"].items():
            for i, sc in enumerate(scores):
                lines.append({"model": role, "kind": "perplexity", "set": name, "index": i, **sc.as_dict()})
        for name, per_item in r["mcq"].items():
            for i, row in enumerate(per_item):
                lines.append({"model": role, "kind": "mcq", "set": name, "index": i, **row})
        for i, text in enumerate(r["generation"] or []):
            lines.append({"model": role, "kind": "generation", "index": i, "prompt": data.prompts[i], "output": text})
    write_text(out / DETAILS_FILE, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return write_json(out / RESULTS_FILE, {k: v for k, v in results.items() if not k.startswith("_")})


def read_results(root: Path) -> Optional[dict]:
    p = eval_dir(root) / RESULTS_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def format_results(results: dict) -> str:
    """The console summary (the report has the same numbers with plots)."""
    lines = ["", "── affinage eval " + "─" * 43]
    for e in results.get("perplexity", []):
        b, t = e.get("base"), e.get("tuned")
        line = f"{e['name']:<20} {e['role']:<10} bits/byte "
        if b and t:
            d = e["delta"]["bits_per_byte"]
            rel = d["relative"]
            verdict = "real" if d["excludes_zero"] else "not established"
            line += (f"{b['bits_per_byte']:.4f} → {t['bits_per_byte']:.4f}  {rel['delta'] * 100:+.1f}% "
                     f"[{rel['ci_low'] * 100:+.1f}%, {rel['ci_high'] * 100:+.1f}%] ({verdict})")
        else:
            line += f"{t['bits_per_byte']:.4f}"
        lines.append(line)
    for e in results.get("mcq", []):
        b, t = e.get("base"), e.get("tuned")
        line = f"{e['name']:<20} {e['role']:<10} acc "
        if b and t:
            d = e["delta"]["acc"]
            line += (f"{b['acc']:.3f} → {t['acc']:.3f}  {d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                     f"   acc_norm {b['acc_norm']:.3f} → {t['acc_norm']:.3f}  ({e['items']} items)")
        else:
            line += f"{t['acc']:.3f}   acc_norm {t['acc_norm']:.3f}  ({e['items']} items)"
        lines.append(line)
    if results.get("generation"):
        lines.append(f"{'generation':<20} {len(results['generation'])} prompts (see the report)")
    le = results.get("lm_eval")
    if le:
        lines.append(f"{'lm-eval':<20} " + (le["skipped"] if "skipped" in le else ", ".join(le["tasks"])))
    root = results.get("_root")
    if root:
        lines.append(f"{'report':<20} {Path(root) / 'report.md'}")
        lines.append(f"{'results':<20} {eval_dir(Path(root)) / RESULTS_FILE}")
    lines.append(f"{'time':<20} {results.get('seconds', 0):.0f} s")
    return "\n".join(lines)
