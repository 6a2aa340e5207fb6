"""The French evaluation pack: every task stages from local records in its Hub layout, and runs offline.

The fixtures (tests/eval/fixtures/fr_pack/<task>.jsonl) are French records written for these tests
in each Hub dataset's own field layout, so staging exercises the real conversion of every task.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from affinage.data.errors import DataError
from affinage.eval import extractive, pack
from affinage.eval.extractive import QaItem
from affinage.eval.sets import read_mcq
from affinage.eval.specs import load_spec_file
from eval_helpers import one_torch_thread  # noqa: F401 (autouse)

RAW = Path(__file__).parent / "fixtures" / "fr_pack"


def test_every_task_names_its_hub_dataset_and_has_a_fixture():
    names = pack.task_names()
    assert {"belebele_fra", "xnli_fr", "pawsx_fr", "french_bench_hellaswag", "fquadv2_hasans", "piaf"} <= set(names)
    for name in names:
        task = pack.load_task(name)
        assert "/" in task.source.hub and task.source.split
        assert (RAW / f"{name}.jsonl").is_file(), f"no fixture for {name}"


def test_stage_from_local_records_converts_every_task(tmp_path):
    spec_path = pack.stage_eval_pack(tmp_path / "pack", raw_dir=RAW)
    spec = load_spec_file(str(spec_path))  # a valid eval: spec
    staged = json.loads((tmp_path / "pack" / "STAGED.json").read_text())["tasks"]
    assert set(staged) == set(pack.task_names())
    assert staged["belebele_fra"]["hub"] == "facebook/belebele" and staged["belebele_fra"]["config"] == "fra_Latn"
    assert all(t["records"] == 3 and len(t["sha256"]) == 64 for t in staged.values())
    assert {s.name for s in spec.mcq} | {s.name for s in spec.extractive} == set(staged)

    by = {s.name: s for s in spec.mcq}
    bele = read_mcq(by["belebele_fra"].path, group_field="group")
    assert bele[1].choices == ("A", "B", "C", "D") and bele[1].answer == 2  # correct_answer_num "3"
    assert bele[0].question.startswith("P: La Loire est le plus long fleuve") and "\nD: À Orléans" in bele[0].question
    assert len({it.group for it in bele}) == 2  # two passages: the bootstrap unit
    paws = read_mcq(by["pawsx_fr"].path)
    assert paws[0].question == "Victor Hugo a écrit Les Misérables en exil à Guernesey, n'est-ce pas?"
    assert paws[0].choices[1] == "Oui, c'est en exil à Guernesey que Victor Hugo a écrit Les Misérables."
    assert [it.answer for it in paws] == [1, 0, 1]
    grammar = read_mcq(by["french_bench_grammar"].path)
    assert grammar[1].choices[1] == "Hier, nous sommes allés au cinéma." and grammar[1].answer == 1
    reading = read_mcq(by["french_bench_reading_comp"].path)
    assert reading[1].choices[1] == "Chambord fut construit à partir de 1519"  # no gap: the answer appended
    hella = read_mcq(by["french_bench_hellaswag"].path)
    assert hella[0].question == "Cuisine: Une femme casse des œufs dans un saladier. Elle"
    assert hella[0].choices[2] == "part faire du ski. en montagne."  # french_bench's [title] clean-up
    assert [it.answer for it in read_mcq(by["french_bench_boolqa"].path)] == [0, 1, 0]
    assert [it.answer for it in read_mcq(by["french_bench_topic_based_nli"].path)] == [0, 1, 2]
    qa = {s.name: s for s in spec.extractive}
    piaf = extractive.read_qa(qa["piaf"].path, group_field="group")
    assert piaf[0].answers == ("François Ier",) and piaf[0].group == "Chambord"
    assert extractive.read_qa(qa["fquadv2_hasans"].path)[1].answers == ("dans l'océan Atlantique à Saint-Nazaire", "à Saint-Nazaire")


def test_a_record_missing_a_field_names_the_task_and_field(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "xnli_fr.jsonl").write_text(json.dumps({"premise": "Il pleut", "label": 0}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"facebook/xnli\[0\]: the record has no field 'hypothesis'"):
        pack.stage_eval_pack(tmp_path / "out", tasks=["xnli_fr"], raw_dir=raw)


def test_exact_match_and_f1_hand_computed():
    golds = ["Léonard de Vinci"]
    assert extractive.exact_match("  léonard de Vinci.", golds) == 1.0  # case, punctuation, spaces
    assert extractive.exact_match("le Léonard de Vinci", golds) == 1.0  # French articles dropped
    # "par Léonard" vs "léonard de vinci": 1 common token, precision 1/2, recall 1/3 -> F1 = 2·(1/2·1/3)/(1/2+1/3) = 0.4
    assert extractive.f1_score("par Léonard", golds) == pytest.approx(0.4)
    assert extractive.exact_match("par Léonard", golds) == 0.0
    # best over the gold answers
    assert extractive.f1_score("à Saint-Nazaire", ["dans l'océan Atlantique à Saint-Nazaire", "à Saint-Nazaire"]) == 1.0
    row = extractive.score_answer(QaItem("c", "q", ("1519",), "f:1"), " 1519\nQuestion : autre chose")
    assert row["answer"] == "1519" and row["exact"] == 1.0 and row["f1"] == 1.0  # cut at the first newline


def test_staged_pack_runs_offline_on_a_tiny_model(tmp_path, tiny_llama_dir, monkeypatch):
    from affinage.eval.runner import run_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec_path = pack.stage_eval_pack(tmp_path / "pack", tasks=["belebele_fra", "piaf"], raw_dir=RAW)
    res = run_eval(str(tiny_llama_dir), spec=load_spec_file(str(spec_path)), out_dir=tmp_path / "ev", progress=False,
                   compare_base=False)
    (m,) = res["mcq"]
    assert m["name"] == "belebele_fra" and m["chance"] == pytest.approx(0.25) and m["groups"] == 2
    assert 0 <= m["tuned"]["acc"] <= 1 and m["tuned"]["acc_ci"]["n_groups"] == 2
    (q,) = res["extractive"]
    assert q["name"] == "piaf" and q["items"] == 3 and 0 <= q["tuned"]["f1"] <= 1 and q["groups"] == 2
    assert res["speed"]["tuned"]["tokens_per_s"] > 0
    details = [json.loads(x) for x in (tmp_path / "ev" / "eval" / "details.jsonl").read_text().splitlines()]
    qa_rows = [d for d in details if d["kind"] == "extractive"]
    assert len(qa_rows) == 3
    for d in qa_rows:  # the stored figures are those of the stored answer
        assert d["f1"] == pytest.approx(extractive.f1_score(d["answer"], d["golds"]))
