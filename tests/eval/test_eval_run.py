"""`affinage eval` end to end on tiny models trained here: base vs fine-tuned, LoRA adapters, the report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from affinage.cli import main
from affinage.evaluate import evaluate as run_eval  # eval, then report and card, as `affinage eval`
from affinage.recipe.loader import load_recipe_dict
from affinage.run import RunDir
from affinage.train.trainer import train
from testlib import shared_dir
from eval_helpers import LAW_ITEMS, general_file, legal_file, texts, write_jsonl, one_torch_thread  # noqa: F401 (autouse)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, request):
    """A LoRA run on French law (records 0-47 of the legal file), with an eval section on records it never saw."""
    pretrained_tiny_dir = request.getfixturevalue("pretrained_tiny_dir")  # built under this module's one thread
    root = tmp_path_factory.mktemp("eval-lora")
    heldout = write_jsonl(root / "heldout.jsonl", [{"text": t} for t in texts(legal_file(), start=100, n=10, max_chars=1200)])
    general = write_jsonl(root / "general.jsonl", [{"text": t} for t in texts(general_file(), n=6, max_chars=1200)])
    items = write_jsonl(root / "items.jsonl", LAW_ITEMS)
    (root / "prompts.txt").write_text("Le Code civil\nLa Constitution\n", encoding="utf-8")
    recipe = load_recipe_dict({
        "name": "eval-lora", "task": "cpt", "seed": 3,
        "model": {"name_or_path": str(pretrained_tiny_dir), "dtype": "float32"},
        "method": {"kind": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"sources": [{"path": str(legal_file()), "format": "text", "max_records": 48, "name": "legal"}],
                 "max_length": 128},
        "training": {"global_batch_size": 8, "micro_batch_size": 8, "duration": "16 steps", "learning_rate": 1e-2,
                     "lr_scheduler": "constant", "report_to": ["none"]},
        "eval": {"perplexity": [{"name": "law", "path": str(heldout)},
                                {"name": "general", "path": str(general), "role": "forgetting"}],
                 "mcq": [{"name": "law-qcm", "path": str(items), "template": "{question}", "num_fewshot": 1}],
                 "generation": {"path": str(root / "prompts.txt"), "max_new_tokens": 8},
                 "lm_eval": {"tasks": ["demo_droit_qcm"]}, "bootstrap": 300, "batch_size": 4},
        "output": {"dir": str(root / "run")},
    })
    run = RunDir.create(recipe.run_dir())
    from affinage.recipe.loader import write_resolved

    write_resolved(recipe, run.recipe)
    train(recipe, run)
    return run, heldout


def test_eval_of_a_lora_run_compares_with_its_base_and_writes_the_report(lora_run, monkeypatch):
    import affinage.eval.harness as harness

    monkeypatch.setattr(harness, "available", lambda: False)
    run, heldout = lora_run
    res = run_eval(run.root, progress=False)
    law = next(e for e in res["perplexity"] if e["name"] == "law")
    assert law["documents"] == 10 and set(res["models"]) == {"base", "tuned"}
    d = law["delta"]["bits_per_byte"]
    assert law["tuned"]["nll"] != law["base"]["nll"]  # the adapter is applied
    if shared_dir():  # 16 LoRA steps on the legal codes lower the bits per byte of articles they never saw
        assert d["delta"] < 0 and d["excludes_zero"], d
    assert law["tuned"]["bits_per_byte"] == pytest.approx(law["base"]["bits_per_byte"] + d["delta"])
    assert res["mcq"][0]["items"] == len(LAW_ITEMS) and 0 <= res["mcq"][0]["tuned"]["acc"] <= 1
    assert len(res["generation"]) == 2 and {"base", "tuned"} <= set(res["generation"][0])
    assert res["lm_eval"]["skipped"] == harness.MISSING

    # the fine-tuned figures are those of base + adapter: check one document with an independent merge
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from affinage.model.load import load_tokenizer_folder

    base_path = json.loads((run.final / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(run.final)).merge_and_unload().eval()
    tok = load_tokenizer_folder(run.final)
    text = json.loads(heldout.read_text(encoding="utf-8").splitlines()[0])["text"]
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    details = [json.loads(l) for l in (run.root / "eval" / "details.jsonl").read_text(encoding="utf-8").splitlines()]
    row = next(r for r in details if r["model"] == "tuned" and r["set"] == "law" and r["index"] == 0)
    from affinage.eval.perplexity import windows

    expected = 0.0
    for s, a, e in windows(len(ids), 128):
        with torch.no_grad():
            lp = torch.log_softmax(merged(torch.tensor([ids[s:e]])).logits[0].float(), -1)
        expected -= sum(float(lp[k - s - 1, ids[k]]) for k in range(a, e))
    assert row["nll"] == pytest.approx(expected, rel=1e-4)

    report = (run.root / "report.md").read_text(encoding="utf-8")
    assert "## Evaluation: base vs fine-tuned" in report and "| law | domain | 10 |" in report
    for png in ("eval/loss.png", "eval/perplexity.png", "eval/mcq.png"):
        assert f"]({png})" in report and (run.root / png).read_bytes()[:8] == PNG
    assert "lm-eval is not installed" in report
    assert (run.final / "README.md").is_file() and (run.root / "provenance.json").is_file()  # refreshed by eval


def test_eval_command_on_a_plain_model_folder(lora_run, tmp_path, capsys):
    run, heldout = lora_run
    code = main(["eval", str(run.final), "--ppl", f"law={heldout}", "--no-base",
                 "--out", str(tmp_path / "out"), "--limit", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "law" in out and "bits/byte" in out
    res = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    assert set(res["models"]) == {"tuned"} and res["perplexity"][0]["documents"] == 3
    assert math.isfinite(res["perplexity"][0]["tuned"]["bits_per_byte"])
    assert (tmp_path / "out" / "report.md").is_file()


def test_eval_without_any_set_says_what_to_write(tmp_path, lora_run, capsys):
    run, _ = lora_run
    assert main(["eval", str(run.final), "--no-base"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(run.root), "--tasks", "nope"]) == 2
    assert "--tasks: unknown nope" in capsys.readouterr().err


def test_eval_frictions_command_line_sets_add_set_and_tasks(lora_run, tmp_path, capsys):
    """Issue 16's frictions: command-line sets add to the recipe's (--replace replaces), --set is accepted,
    a command-line set name works in --tasks, --mcq takes the recipe's keys, bad targets and limits are clear."""
    run, heldout = lora_run
    renamed = write_jsonl(tmp_path / "qcm.jsonl", [{"question": it["question"], "choices": it["choices"],
                                                    "answer_index": "ABCD"[it["answer"]]} for it in LAW_ITEMS])
    out = tmp_path / "added"
    code = main(["eval", str(run.root), "--mcq", f"qcm-renamed={renamed},answer_field=answer_index,role=forgetting",
                 "--tasks", "qcm-renamed,law", "--set", "eval.bootstrap=200", "--limit", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "eval" / "results.json").read_text())
    assert [e["name"] for e in res["mcq"]] == ["qcm-renamed"] and res["mcq"][0]["role"] == "forgetting"
    assert [e["name"] for e in res["perplexity"]] == ["law"]  # the recipe's set, kept beside the command line's
    assert res["settings"]["bootstrap"] == 200 and "chance" in res["mcq"][0]
    assert "chance" in capsys.readouterr().out
    out2 = tmp_path / "replaced"
    assert main(["eval", str(run.root), "--ppl", f"only={heldout}", "--replace", "--limit", "2", "--out", str(out2)]) == 0
    res = json.loads((out2 / "eval" / "results.json").read_text())
    assert [e["name"] for e in res["perplexity"]] == ["only"] and res["mcq"] == []
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory or model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # refused by the argument parser, before anything loads
        main(["eval", str(run.root), "--limit", "-5"])
    assert e.value.code == 2 and "must be at least 1 (got -5)" in capsys.readouterr().err
    assert main(["eval", str(run.final), "--mcq", f"x={renamed},colour=blue", "--no-base"]) == 2
    assert "'colour' is not an option of a mcq set" in capsys.readouterr().err


def test_eval_qa_on_the_command_line_compares_base_and_reports(lora_run, tmp_path, capsys):
    """--qa NAME=PATH,key=value adds an extractive set: EM/F1 for both models, the change with its grouped
    interval in results.json, the console and report.md, and each answer in details.jsonl."""
    run, _ = lora_run
    ctx = ("La Cour des comptes a été créée en 1807 par Napoléon Ier. Elle contrôle l'emploi de l'argent public. "
           "Le Conseil constitutionnel, créé en 1958, veille à la conformité des lois à la Constitution.")
    qa = write_jsonl(tmp_path / "qa.jsonl", [
        {"texte": ctx, "question": "En quelle année la Cour des comptes a-t-elle été créée ?", "answers": {"text": ["1807"], "answer_start": [35]}, "article": "cour"},
        {"texte": ctx, "question": "Par qui la Cour des comptes a-t-elle été créée ?", "answers": ["Napoléon Ier"], "article": "cour"},
        {"texte": ctx, "question": "Quand le Conseil constitutionnel a-t-il été créé ?", "answers": ["1958", "en 1958"], "article": "conseil"},
    ])
    out = tmp_path / "qa-eval"
    code = main(["eval", str(run.root), "--qa", f"droit-qa={qa},context_field=texte,group_field=article,max_new_tokens=8",
                 "--tasks", "droit-qa", "--set", "eval.bootstrap=200", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    console = capsys.readouterr().out
    res = json.loads((out / "eval" / "results.json").read_text())
    (e,) = res["extractive"]
    assert e["name"] == "droit-qa" and e["items"] == 3 and e["groups"] == 2
    assert set(e["delta"]) == {"exact", "f1"} and e["delta"]["f1"]["n_groups"] == 2
    assert res["perplexity"] == [] and res["mcq"] == []
    rows = [json.loads(x) for x in (out / "eval" / "details.jsonl").read_text().splitlines()]
    assert sorted(r["model"] for r in rows if r["kind"] == "extractive") == ["base"] * 3 + ["tuned"] * 3
    assert "droit-qa" in console and "exact" in console
    from affinage.provenance.report import write_report

    report = write_report(out, results=res).read_text()  # the report of a run goes to the run; this one from --out's files
    assert "Extractive question answering" in report and "| droit-qa | domain | 3 in 2 groups |" in report
