"""Bridge to EleutherAI's lm-evaluation-harness, for task folders on local disk.

lm-eval is an optional extra (``pip install 'affinage[lm-eval]'``). Without it the tasks are
skipped with :data:`MISSING` in the results and the report, never an import error. With it, the
models already loaded by ``affinage eval`` are handed to lm-eval's ``HFLM`` (an adapter is merged
first: ``HFLM`` takes plain transformers models), tasks come from ``include_path`` (YAML task
files whose data are local files, e.g. ``dataset_path: json``) and datasets are read offline.

:func:`write_mcq_task` turns one of affinage's multiple-choice JSONL files into such a task
(french_bench style: ``output_type: multiple_choice``, ``acc`` and ``acc_norm``), so the same
items can be scored by both implementations.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import yaml
from affinage.paths import expand

MISSING = (
    "lm-eval is not installed, so the lm-evaluation-harness tasks were skipped. Install the extra on a node "
    "with internet (pip install 'affinage[lm-eval]'), then rerun affinage eval."
)


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def write_mcq_task(folder: str | os.PathLike, name: str, items_path: str | os.PathLike, *,
                   template: str = "Question : {question}\nRéponse :", num_fewshot: int = 0) -> Path:
    """Write ``<folder>/<name>.yaml``, an lm-eval multiple-choice task over a local affinage MCQ file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jinja = template.replace("{question}", "{{question}}")
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(items_path).resolve())}},
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": jinja,
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "num_fewshot": num_fewshot,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "written_by": "affinage"},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _metric_name(key: str) -> tuple[str, str]:
    """lm-eval's ``"acc,none"`` → ``("acc", "none")``."""
    metric, _, filt = key.partition(",")
    return metric, filt or "none"


def parse_results(out: dict) -> dict:
    """Per task: metrics, their standard errors, documents and per-document scores (for pairing)."""
    tasks: dict[str, Any] = {}
    samples = out.get("samples") or {}
    n_samples = out.get("n-samples") or {}
    for task, metrics in (out.get("results") or {}).items():
        entry: dict[str, Any] = {"metrics": {}, "stderr": {}}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            metric, _ = _metric_name(key)
            if metric.endswith("_stderr"):
                entry["stderr"][metric[: -len("_stderr")]] = float(value)
            else:
                entry["metrics"][metric] = float(value)
        docs = sorted(samples.get(task) or [], key=lambda s: s.get("doc_id", 0))
        per_doc: dict[str, list[float]] = {}
        for metric in entry["metrics"]:
            values = [d.get(metric) for d in docs]
            if values and all(isinstance(v, (int, float)) for v in values):
                per_doc[metric] = [float(v) for v in values]
        if per_doc:
            entry["per_doc"] = per_doc
        n = n_samples.get(task, {})
        entry["documents"] = n.get("effective") if isinstance(n, dict) else None
        if entry["documents"] is None and docs:
            entry["documents"] = len(docs)
        tasks[task] = entry
    return {"tasks": tasks, "versions": {k: v for k, v in (out.get("versions") or {}).items()},
            "lm_eval_version": out.get("lm_eval_version") or _version()}


def _version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:
        return None


def run(model, tokenizer, spec, *, batch_size: int = 8, max_length: Optional[int] = None, device: str = "cpu",
        limit: Optional[int] = None, seed: int = 1234) -> dict:
    """Run ``spec.tasks`` (an :class:`~affinage.recipe.schema.LmEvalSpec`) on an in-memory model."""
    if not available():
        return {"skipped": MISSING}
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if hasattr(model, "merge_and_unload"):  # a peft adapter model: HFLM wants a plain transformers model
        model = model.merge_and_unload()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
    include = str(expand(spec.include_path).resolve()) if spec.include_path else None
    manager = TaskManager(include_path=include) if include else TaskManager()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=limit or spec.limit,
        task_manager=manager, log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return parse_results(out or {})
