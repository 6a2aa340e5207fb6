"""The preference: section: TRL's own loss names, file:line errors, base: and --set, plan's memory terms."""

from __future__ import annotations

from pathlib import Path

import pytest

from affinage.recipe.loader import RecipeError, load_recipe
from affinage.recipe.preference import DPO_LOSS_TYPES, KTO_LOSS_TYPES

BASE = """\
name: pref
task: {task}
model: {{name_or_path: some/model}}
method: {{kind: {kind}}}
data: {{sources: [{{path: prefs.jsonl, format: preference}}], max_length: 256}}
training: {{global_batch_size: 4, duration: 10 steps}}
"""


def write(tmp_path: Path, text: str, name="r.yaml") -> Path:
    (tmp_path / "prefs.jsonl").write_text("{}\n")
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_loss_names_are_the_ones_trl_accepts():
    from trl import DPOConfig, KTOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = help_text.split("Possible values are:")[1].split(". If multiple")[0]
    assert set(DPO_LOSS_TYPES) == {x.strip(" `'") for x in listed.split(",")}
    assert set(KTO_LOSS_TYPES) == set(KTOConfig.__dataclass_fields__["loss_type"].metadata["choices"])


def test_defaults_per_task_and_reference_auto(tmp_path):
    dpo = load_recipe(write(tmp_path, BASE.format(task="dpo", kind="lora")))
    assert dpo.preference.losses == ["sigmoid"] and dpo.preference.resolved_reference("lora") == "adapter_disabled"
    kto = load_recipe(write(tmp_path, BASE.format(task="kto", kind="full")))
    assert kto.preference.losses == ["kto"] and kto.preference.resolved_reference("full") == "frozen_copy"


@pytest.mark.parametrize("kind, section, needle", [
    ("lora", "preference: {loss_type: kto}", "not a dpo loss"),
    ("full", "preference: {reference: adapter_disabled}", "no adapter to switch off"),
    ("lora", "preference: {reference: frozen_copy}", "adapter switched off already is"),
    ("lora", "preference: {reference: none, loss_type: robust}", "reference-free training is defined for"),
    ("lora", "preference: {start: stacked}", "needs preference.from_run"),
    ("lora", "preference: {beta: 0}", "beta must be > 0"),
    ("lora", "preference: {max_prompt_length: 300}", "leaves no room"),
    ("lora", "preference: {loss_type: [sigmoid, sft], loss_weights: [1.0]}", "one per loss_type"),
    ("lora", "preference: {betta: 0.2}", "betta"),
])
def test_bad_preference_settings_point_at_their_line(tmp_path, kind, section, needle):
    path = write(tmp_path, BASE.format(task="dpo", kind=kind) + section + "\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert f"{path}:7" in msg and needle in msg, msg


def test_preference_section_needs_a_preference_task(tmp_path):
    with pytest.raises(RecipeError, match="for task: dpo or task: kto"):
        load_recipe(write(tmp_path, BASE.format(task="sft", kind="lora").replace("format: preference", "format: chat")
                          + "preference: {beta: 0.2}\n"))


def test_base_composition_and_set_overrides(tmp_path):
    write(tmp_path, BASE.format(task="dpo", kind="lora") + "preference: {beta: 0.2, loss_type: ipo}\n", "base.yaml")
    child = write(tmp_path, "base: base.yaml\nname: child\npreference: {label_smoothing: 0.1}\n", "child.yaml")
    r = load_recipe(child, overrides=["preference.beta=0.5", "preference.reference=none"])
    p = r.preference
    assert (p.beta, p.losses, p.label_smoothing, p.reference) == (0.5, ["ipo"], 0.1, "none")


def test_memory_estimate_counts_the_reference_and_both_completions():
    from affinage.distributed.memory import estimate_memory

    shape = dict(params_total=10_000_000, params_trainable=10_000_000, params_linear=8_000_000, hidden=256, intermediate=1024,
                 layers=4, vocab=32000, seq_len=512, micro_batch=2, dtype="bfloat16", quantized_4bit=False,
                 optimizer="adamw_torch", gradient_checkpointing=False)
    sft = estimate_memory(**shape)
    dpo_frozen = estimate_memory(**shape, sequences_per_sample=2, reference_copy=True)
    assert dpo_frozen.reference == sft.weights == 20_000_000
    assert dpo_frozen.activations == 2 * sft.activations and dpo_frozen.logits == 2 * sft.logits
    assert dpo_frozen.total == sft.total + sft.weights + sft.activations + sft.logits
    zero3 = estimate_memory(**shape, strategy="zero3", world_size=4, reference_copy=True)
    assert zero3.reference == zero3.weights  # sharded like the policy


def test_chunked_head_is_refused_for_preference_tasks(tmp_path):
    """TRL's DPO/KTO trainers compute their own log-probabilities: a chunked head there would be silently ignored."""
    text = BASE.format(task="dpo", kind="lora").replace("duration: 10 steps}", "duration: 10 steps, loss: {kind: chunked}}")
    assert "loss: {kind: chunked}" in text
    with pytest.raises(RecipeError, match="training.loss.kind: chunked with task: dpo"):
        load_recipe(write(tmp_path, text))
