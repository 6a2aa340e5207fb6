"""DPO on 2 processes under a sharded strategy: TRL's DPOTrainer inside affinage's strategy hooks.

One torchrun launch (``dist_driver.py``) trains an uninterrupted run and a run stopped at step 3 and
resumed; the tests read what really ran from ``distributed/runtime.json``.
"""

from __future__ import annotations

import json
import math

import pytest
from dist_helpers import final_weights, launch_driver, losses, max_weight_diff, needs, runtime

RECIPE = """name: dist-dpo-{strategy}
task: dpo
seed: 7
model: {{name_or_path: {model}, dtype: float32}}
method: {{kind: lora, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
preference: {{beta: 0.1}}
data:
  sources: [{{path: {data}, format: preference, max_records: 32}}]
  max_length: 128
  cache_dir: {cache}
training:
  global_batch_size: 4
  micro_batch_size: 2
  duration: 8 steps
  learning_rate: 1e-2
  lr_scheduler: constant
  report_to: [none]
  save_every: 4
  keep_checkpoints: 3
distributed: {{strategy: {strategy}}}
output: {{dir: {out}}}
"""


@pytest.fixture(scope="module")
def zero3_dpo(tmp_path_factory, pretrained_tiny_dir, demo_data):
    needs("zero3")
    folder = tmp_path_factory.mktemp("dist-dpo")
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE.format(strategy="zero3", model=pretrained_tiny_dir, data=demo_data / "preferences.jsonl",
                                    cache=folder / "cache", out=folder / "run"), encoding="utf-8")
    result = launch_driver(recipe, 2, folder / "driver.json", ref=folder / "ref", cut=folder / "cut")
    return folder, result


def test_dpo_trains_under_zero3_on_two_processes(zero3_dpo):
    folder, result = zero3_dpo
    ref = folder / "ref"
    ranks = runtime(ref)["end"]
    assert len(ranks) == 2 and all(r["num_processes"] == 2 for r in ranks)
    assert {r["zero_stage"] for r in ranks} == {3}, ranks
    assert all(r["trainable_local_numel"] * 2 == 17408 for r in ranks), ranks  # each rank holds half of the LoRA matrices
    assert result["ref"]["completed"] and result["ref"]["world_size"] == 2 and result["ref"]["gradient_accumulation"] == 1
    ls = losses(ref)
    assert abs(ls[0] - math.log(2)) < 1e-3, ls  # policy == reference (adapter off) at step 0
    # Each step's loss is over 4 new pairs and swings from 0.3 to 1.6 at this learning rate (CI's CPU saw
    # another path than this one's), so "trains" is judged on the whole training set after the run:
    # the gathered adapter's DPO loss on its 32 pairs, scored in this process, against log 2 at the start.
    # Seeds 1, 2, 3, 7 here: loss 0.29 to 0.33, reward accuracy 0.84 to 0.94.
    train_loss, accuracy = dpo_loss_on_training_pairs(ref, beta=0.1)
    assert train_loss < math.log(2) - 0.1 and accuracy > 0.6, (train_loss, accuracy, ls)
    weights = final_weights(ref)
    assert sum(v.numel() for v in weights.values()) == 17408  # the whole adapter, gathered


def test_dpo_stop_and_resume_under_zero3_gives_the_same_adapter(zero3_dpo):
    folder, result = zero3_dpo
    assert not result["cut_first"]["completed"] and result["cut_first"]["steps"] == 4  # STOP at step 3: saved after step 4
    assert result["cut"]["completed"] and result["cut"]["resumed_from"].endswith("checkpoint-4")
    assert losses(folder / "cut")[-1] == losses(folder / "ref")[-1]
    assert max_weight_diff(final_weights(folder / "cut"), final_weights(folder / "ref")) == 0.0


def dpo_loss_on_training_pairs(run_dir, *, beta: float) -> tuple[float, float]:
    """Mean DPO loss and reward accuracy of the final adapter on the run's training pairs (reference: adapter off)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from affinage.data.preference import PreferenceCache
    from affinage.eval.preference import score_pairs

    cache = PreferenceCache.open(json.loads((run_dir / "data_stats.json").read_text())["cache"])
    pairs = [cache.train[i] for i in range(len(cache.train))]
    config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "final")
    tok = AutoTokenizer.from_pretrained(config["base_model_name_or_path"])
    policy = score_pairs(model, tok, pairs)
    with model.disable_adapter():
        reference = score_pairs(model, tok, pairs)
    z = torch.tensor([beta * ((p["chosen_logp"] - r["chosen_logp"]) - (p["rejected_logp"] - r["rejected_logp"]))
                      for p, r in zip(policy, reference)])
    return float(-torch.nn.functional.logsigmoid(z).mean()), float((z > 0).float().mean())
