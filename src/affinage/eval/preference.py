"""Held-out preference pairs: does the model put more likelihood on the chosen reply than on the rejected one?

For every held-out pair of a dpo/kto run (the prepared cache's held-out split, the same token ids
training saw for its pairs: prompt tokens never scored) each model gets the summed log-likelihood
of the chosen and of the rejected completion. Reported, for the model before alignment (the start
of the preference stage: the SFT model) and after:

- preference accuracy: share of pairs with log p(chosen) > log p(rejected), and its paired change;
- log-likelihood margin log p(chosen) − log p(rejected), and its paired change;
- DPO implicit reward margin of the aligned model against the one before,
  β · [(log p_t(c) − log p_b(c)) − (log p_t(r) − log p_b(r))], and the share of pairs where it is > 0
  (TRL's ``rewards/accuracies`` with the base as reference).

Intervals: paired bootstrap over pairs (``affinage.eval.stats``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from affinage.eval.results import change_text, verdict_text
from affinage.eval.stats import mean_ci, paired_mean_delta

PREFERENCE_TASKS = ("dpo", "kto")


def is_preference_run(recipe) -> bool:
    return recipe is not None and recipe.task in PREFERENCE_TASKS


# ---------------------------------------------------------------------------------- models
def preference_target(t, base: Optional[str], compare_base: bool):
    """Fill ``t.tuned``/``t.base`` (``eval.models.Target``) for a preference run: the aligned model and its start."""
    from affinage.errors import UserError
    from affinage.eval.models import ModelRef, _folder_spec

    run, recipe = t.run, t.recipe
    summary = json.loads(run.summary.read_text(encoding="utf-8")) if run.summary.is_file() else {}
    pref = summary.get("preference") or {}
    start_model = pref.get("start_model") or recipe.model.name_or_path
    stacked = pref.get("stacked_adapter")
    start_spec = recipe.model.model_copy(update={"name_or_path": start_model})
    if start_model != recipe.model.name_or_path:
        start_spec = start_spec.model_copy(update={"init": "pretrained"})
    seed = recipe.seed if start_spec.init == "random" else None
    tok = run.final if (run.final / "tokenizer_config.json").is_file() else None
    if (run.merged / "config.json").is_file():
        t.tuned = ModelRef(f"aligned ({run.merged.name}/)", _folder_spec(run.merged))
    elif (run.final / "adapter_config.json").is_file():
        t.tuned = ModelRef(f"aligned ({run.final.name}/ adapter on {start_model})", start_spec, seed=seed, adapter=run.final,
                           tokenizer_folder=tok)
    elif (run.final / "config.json").is_file():
        t.tuned = ModelRef(f"aligned ({run.final.name}/)", _folder_spec(run.final))
    else:
        raise UserError(f"{run.root} has no aligned model yet (no final/): finish the training first (affinage train {run.recipe})")
    if compare_base:
        if base:
            t.base = ModelRef(f"base ({base})", _folder_spec(base))
        else:
            what = "SFT adapter " + str(stacked) if stacked else start_model
            t.base = ModelRef(f"before alignment ({what})", start_spec, seed=seed, adapter=Path(stacked) if stacked else None,
                              tokenizer_folder=tok)
    return t


# ---------------------------------------------------------------------------------- data
def heldout_pairs(t, limit: Optional[int] = None) -> Optional[list[dict]]:
    """The run's held-out pairs (prompt/chosen/rejected ids) from its prepared cache; None if not a preference run."""
    if t.run is None or not is_preference_run(t.recipe):
        return None
    from affinage.data.preference import PreferenceCache

    cache = None
    stats = t.run.data_stats
    if stats.is_file():
        path = json.loads(stats.read_text(encoding="utf-8")).get("cache")
        if path and (Path(path) / "meta.json").is_file():
            cache = PreferenceCache.open(Path(path))
    if cache is None:
        from affinage.data.prepare import prepare

        cache = prepare(t.recipe)
    if cache.heldout is None or cache.heldout.kind != "paired":
        return []
    n = len(cache.heldout) if not limit else min(limit, len(cache.heldout))
    return [cache.heldout[i] for i in range(n)]


# ------------------------------------------------------------------------------- scoring
def score_pairs(model, tokenizer, pairs: list[dict], *, batch_size: int = 8, device: Optional[str] = None) -> list[dict]:
    """Summed log-likelihood of each pair's chosen and rejected completion (prompt tokens not scored)."""
    import torch

    device = device or str(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    seqs: list[tuple[list[int], int]] = []  # (ids, prompt length)
    for p in pairs:
        for k in ("chosen_ids", "rejected_ids"):
            seqs.append((list(p["prompt_ids"]) + list(p[k]), len(p["prompt_ids"])))
    logps: list[float] = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # similar lengths together
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(seqs[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            comp = torch.zeros((len(idx), width), dtype=torch.bool)
            for row, i in enumerate(idx):
                x, n_prompt = seqs[i]
                ids[row, : len(x)] = torch.tensor(x)
                att[row, : len(x)] = 1
                comp[row, n_prompt : len(x)] = True
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            mask = comp[:, 1:].to(device)
            sums = (lp * mask).sum(dim=1).cpu().tolist()
            for row, i in enumerate(idx):
                logps[i] = float(sums[row])
    out = []
    for j, p in enumerate(pairs):
        out.append({"chosen_logp": logps[2 * j], "rejected_logp": logps[2 * j + 1],
                    "chosen_tokens": len(p["chosen_ids"]), "rejected_tokens": len(p["rejected_ids"])})
    return out


def _margins(scores: list[dict]) -> np.ndarray:
    return np.asarray([s["chosen_logp"] - s["rejected_logp"] for s in scores], dtype=float)


def _norm_margins(scores: list[dict]) -> np.ndarray:
    """Per-token log-likelihood margin: the summed margin favours the shorter reply, this one does not."""
    return np.asarray([s["chosen_logp"] / max(1, s["chosen_tokens"]) - s["rejected_logp"] / max(1, s["rejected_tokens"])
                       for s in scores], dtype=float)


def preference_entry(raw: dict[str, list[dict]], *, beta: float, bootstrap: int, confidence: float, seed: int) -> dict:
    """results.json's ``preference`` entry from per-model pair scores (``raw[role]``)."""
    kw = dict(iterations=bootstrap, confidence=confidence, seed=seed)
    roles = [r for r in ("base", "tuned") if r in raw]
    n = len(raw[roles[0]]) if roles else 0
    entry: dict[str, Any] = {"name": "heldout-pairs", "pairs": n, "beta": beta}
    if n == 0:
        return entry
    for role in roles:
        m = _margins(raw[role])
        acc = (m > 0).astype(float)
        acc_norm = (_norm_margins(raw[role]) > 0).astype(float)
        entry[role] = {"accuracy": float(acc.mean()), "accuracy_ci": mean_ci(acc, **kw),
                       "accuracy_norm": float(acc_norm.mean()), "accuracy_norm_ci": mean_ci(acc_norm, **kw),
                       "margin": float(m.mean()), "margin_ci": mean_ci(m, **kw),
                       "chosen_logp": float(np.mean([s["chosen_logp"] for s in raw[role]])),
                       "rejected_logp": float(np.mean([s["rejected_logp"] for s in raw[role]]))}
    if "base" in raw and "tuned" in raw:
        mb, mt = _margins(raw["base"]), _margins(raw["tuned"])
        reward = beta * (mt - mb)  # = beta * ((c_t - c_b) - (r_t - r_b))
        entry["delta"] = {"accuracy": paired_mean_delta((mb > 0).astype(float), (mt > 0).astype(float), **kw),
                          "accuracy_norm": paired_mean_delta((_norm_margins(raw["base"]) > 0).astype(float),
                                                             (_norm_margins(raw["tuned"]) > 0).astype(float), **kw),
                          "margin": paired_mean_delta(mb, mt, **kw)}
        entry["reward_margin"] = mean_ci(reward, **kw)
        entry["reward_accuracy"] = mean_ci((reward > 0).astype(float), **kw)
    return entry


def format_line(e: dict) -> str:
    b, t = e.get("base"), e.get("tuned")
    if not t:
        return f"{'preference':<20} no held-out pairs"
    if b:
        d = e["delta"]["accuracy"]
        dn = e["delta"]["accuracy_norm"]
        return (f"{'preference':<20} {e['pairs']} pairs  accuracy {b['accuracy']:.3f} → {t['accuracy']:.3f}  "
                f"{change_text(d)} ({verdict_text(d)}); per token "
                f"{b['accuracy_norm']:.3f} → {t['accuracy_norm']:.3f} {change_text(dn)}; reward margin "
                f"{change_text(e['reward_margin'], key='value')}")
    return f"{'preference':<20} {e['pairs']} pairs  accuracy {t['accuracy']:.3f}  margin {t['margin']:+.3f}"
