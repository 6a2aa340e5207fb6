"""Decontamination: training documents sharing a long n-gram with evaluation files are dropped or reported."""

from __future__ import annotations

from affinage.data.decontam import build_eval_index
from affinage.data.prepare import prepare
from affinage.recipe.schema import DecontaminationSpec
from data_helpers import make_recipe, write_jsonl

EVAL_PASSAGE = (
    "La bataille de Valmy eut lieu le vingt septembre mille sept cent quatre-vingt-douze et marqua la première "
    "victoire décisive des armées de la Révolution française contre les troupes prussiennes"
)


def corpus(tmp_path):
    docs = [{"text": f"Texte sans rapport numéro {i} sur la cuisine lyonnaise et les marchés du dimanche matin."} for i in range(8)]
    # copies 14 consecutive words of the evaluation passage, in other casing and punctuation
    docs[2] = {"text": "Rappel : LA BATAILLE de Valmy eut lieu le vingt septembre mille sept cent quatre-vingt-douze, et voilà."}
    # shares only 6 words: not contaminated
    docs[5] = {"text": "On dit que la bataille de Valmy eut lieu un jour de pluie, rien de plus."}
    write_jsonl(tmp_path / "train.jsonl", docs)
    write_jsonl(tmp_path / "eval.jsonl", [
        {"messages": [{"role": "user", "content": "Raconte Valmy."}, {"role": "assistant", "content": EVAL_PASSAGE}]},
        {"text": "Oui."},  # too short to check
    ])
    return tmp_path / "train.jsonl", tmp_path / "eval.jsonl"


def test_eval_index_matches_13_grams_across_case_and_punctuation(tmp_path):
    _, ev = corpus(tmp_path)
    index = build_eval_index(DecontaminationSpec(eval_files=[str(ev)]))
    assert index.check({"text": "… la bataille de Valmy eut lieu le vingt septembre mille sept cent quatre-vingt-douze !"})
    assert index.check({"text": "la bataille de Valmy eut lieu un jour"}) is None
    assert index.check({"messages": [{"role": "user", "content": "la bataille de Valmy eut lieu le vingt"},
                                     {"role": "assistant", "content": "septembre mille sept cent quatre-vingt-douze"}]}) is None
    assert index.summary()["eval_texts_too_short_to_check"] >= 1


def test_drop_and_report_with_counts(tmp_path, trained_tokenizer):
    train, ev = corpus(tmp_path)
    for action, kept in (("drop", 7), ("report", 8)):
        r = make_recipe([{"path": str(train), "name": "t"}], task="cpt", max_length=64, cache_dir=str(tmp_path / "cache"),
                        num_proc=1, decontamination={"eval_files": [str(ev)], "action": action})
        st = prepare(r, trained_tokenizer, progress=False).stats
        src = st["sources"]["t"]
        assert src["contamination"]["documents"] == 1
        assert src["contamination"]["examples"][0]["where"].endswith("train.jsonl:3")
        assert src["documents_kept"] == kept
        assert st["decontamination"]["documents"] == 1 and st["decontamination"]["action"] == action
        if action == "drop":
            assert src["filters"]["contaminated"]["dropped"] == 1
