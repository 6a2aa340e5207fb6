"""`affinage plan` counts the training records prepare will keep."""

from __future__ import annotations

from affinage.plan import _count_records
from affinage.recipe.loader import load_recipe_dict
from testlib import DEMO_DATA


def test_plan_counts_training_records_with_the_heldout_cap(tiny_llama_dir):
    path = DEMO_DATA / "qa_culture.jsonl"
    lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())

    def recipe(**data):
        return load_recipe_dict({
            "name": "plan-count", "task": "sft", "model": {"name_or_path": str(tiny_llama_dir)},
            "data": {"sources": [{"path": str(path), "format": "chat"}], **data},
            "training": {"global_batch_size": 4, "duration": "1 epochs"},
        })

    assert _count_records(recipe()) == lines
    assert _count_records(recipe(heldout_fraction=0.5)) == lines - int(lines * 0.5 + 0.5)
    # heldout_max caps what leaves training: prepare keeps all but 2 records for training
    assert _count_records(recipe(heldout_fraction=0.5, heldout_max=2)) == lines - 2


def test_plan_of_a_dpo_recipe_says_which_sft_run_it_starts_from_and_how_to_chain_it(tiny_llama_dir, tmp_path):
    from affinage.plan import format_plan, make_plan

    sft = tmp_path / "sft"
    recipe = load_recipe_dict({
        "name": "plan-dpo", "task": "dpo", "model": {"name_or_path": str(tiny_llama_dir)},
        "method": {"kind": "lora"}, "preference": {"from_run": str(sft), "start": "stacked"},
        "data": {"sources": [{"path": str(DEMO_DATA / "preferences.jsonl"), "format": "preference"}]},
        "training": {"global_batch_size": 4, "duration": "3 steps"},
    })
    text = format_plan(make_plan(recipe))
    assert (f"starts from     SFT run {sft} (start: stacked; {sft}/final not trained yet: train the SFT recipe first, "
            "or on SLURM chain both: affinage submit RECIPE --pipeline prepare,sft,dpo,eval --from-recipe SFT_RECIPE)") in text
    (sft / "final").mkdir(parents=True)
    assert f"starts from     SFT run {sft} (start: stacked; trained)" in format_plan(make_plan(recipe))
