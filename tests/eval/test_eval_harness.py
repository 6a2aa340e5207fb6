"""The lm-evaluation-harness bridge: a clear skip without lm-eval, and its wiring checked with a stand-in."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import yaml

from affinage.eval import harness
from affinage.recipe.schema import LmEvalSpec
from eval_helpers import LAW_ITEMS, write_jsonl, one_torch_thread  # noqa: F401 (autouse)


def test_without_lm_eval_the_tasks_are_skipped_with_the_install_command(monkeypatch):
    monkeypatch.setattr(harness, "available", lambda: False)
    out = harness.run(object(), object(), LmEvalSpec(tasks=["french_bench_arc_challenge"]))
    assert out == {"skipped": harness.MISSING}
    assert "pip install 'affinage[lm-eval]'" in harness.MISSING


def test_mcq_file_becomes_a_local_multiple_choice_task(tmp_path):
    items = write_jsonl(tmp_path / "law.jsonl", LAW_ITEMS)
    path = harness.write_mcq_task(tmp_path / "tasks", "droit_qcm", items, template="Question : {question}\nRéponse :")
    task = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert task["dataset_path"] == "json" and task["dataset_kwargs"]["data_files"]["test"] == str(items.resolve())
    assert task["output_type"] == "multiple_choice" and task["doc_to_choice"] == "choices"
    assert task["doc_to_target"] == "answer" and task["doc_to_text"] == "Question : {{question}}\nRéponse :"
    assert {m["metric"] for m in task["metric_list"]} == {"acc", "acc_norm"}


def _fake_lm_eval(calls: dict):
    """Modules shaped like lm-eval 0.4 (simple_evaluate, HFLM, TaskManager) that record how they are called."""
    root = types.ModuleType("lm_eval")
    root.__spec__ = importlib.machinery.ModuleSpec("lm_eval", None)

    class HFLM:
        def __init__(self, **kw):
            calls["hflm"] = kw

    class TaskManager:
        def __init__(self, include_path=None):
            calls["include_path"] = include_path

    def simple_evaluate(**kw):
        calls["evaluate"] = kw
        return {
            "results": {"droit_qcm": {"alias": "droit_qcm", "acc,none": 0.5, "acc_stderr,none": 0.2,
                                      "acc_norm,none": 0.25, "acc_norm_stderr,none": 0.19}},
            "samples": {"droit_qcm": [{"doc_id": 1, "acc": 0.0, "acc_norm": 0.0}, {"doc_id": 0, "acc": 1.0, "acc_norm": 1.0},
                                      {"doc_id": 3, "acc": 0.0, "acc_norm": 0.0}, {"doc_id": 2, "acc": 1.0, "acc_norm": 0.0}]},
            "n-samples": {"droit_qcm": {"original": 4, "effective": 4}},
            "versions": {"droit_qcm": 1.0},
        }

    root.simple_evaluate = simple_evaluate
    models, hf, tasks = (types.ModuleType(n) for n in ("lm_eval.models", "lm_eval.models.huggingface", "lm_eval.tasks"))
    hf.HFLM, tasks.TaskManager = HFLM, TaskManager
    return {"lm_eval": root, "lm_eval.models": models, "lm_eval.models.huggingface": hf, "lm_eval.tasks": tasks}


def test_with_lm_eval_the_loaded_model_and_local_tasks_are_handed_over(monkeypatch, tmp_path):
    calls: dict = {}
    for name, mod in _fake_lm_eval(calls).items():
        monkeypatch.setitem(sys.modules, name, mod)
    assert harness.available()

    class Adapter:  # a peft model is merged before lm-eval sees it
        def merge_and_unload(self):
            return "merged-model"

    spec = LmEvalSpec(tasks=["droit_qcm"], include_path=str(tmp_path), num_fewshot=2, limit=10)
    out = harness.run(Adapter(), "tokenizer", spec, batch_size=4, max_length=256, device="cpu", seed=5)
    assert calls["hflm"] == {"pretrained": "merged-model", "tokenizer": "tokenizer", "batch_size": 4, "max_length": 256, "device": "cpu"}
    assert calls["include_path"] == str(tmp_path.resolve())
    ev = calls["evaluate"]
    assert ev["tasks"] == ["droit_qcm"] and ev["num_fewshot"] == 2 and ev["limit"] == 10 and ev["log_samples"]
    t = out["tasks"]["droit_qcm"]
    assert t["metrics"] == {"acc": 0.5, "acc_norm": 0.25} and t["stderr"] == {"acc": 0.2, "acc_norm": 0.19}
    assert t["per_doc"]["acc"] == [1.0, 0.0, 1.0, 0.0] and t["documents"] == 4  # sorted by doc_id, for pairing


def test_parse_results_keeps_filters_apart():
    out = harness.parse_results({"results": {"t": {"exact_match,strict-match": 0.4, "alias": "t"}}})
    assert out["tasks"]["t"]["metrics"] == {"exact_match": 0.4}
