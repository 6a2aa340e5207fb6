"""LoRA (and QLoRA) under sharding: the adapter is gathered whole, saved alone, and reloads exactly.

Under ZeRO-3 and FSDP2 each rank holds half of every LoRA matrix; ``final/`` must still be a normal
PEFT adapter folder (full-size ``lora_A``/``lora_B``, no base weights) that plain transformers + peft
reload into the model that was in memory.
"""

from __future__ import annotations

import pytest
import torch
from dist_helpers import final_weights, losses, max_weight_diff, reload_logits, run_slow, runtime, slow


@pytest.mark.parametrize("strategy", ["zero3", pytest.param("fsdp2", marks=[slow, run_slow])])
def test_dist_lora_adapter_is_gathered_and_reloads(dist_runs, strategy):
    runs = dist_runs.get(strategy, kind="lora")
    ranks = runtime(runs.ref)["end"]
    for r in ranks:
        assert r["trainable_local_numel"] * 2 == 17408, r  # r=8 LoRA on every linear: 17,408 values, half per rank
    weights = final_weights(runs.ref)
    assert weights and all("lora_" in k for k in weights), sorted(weights)[:5]
    assert not (runs.ref / "final" / "model.safetensors").exists()
    assert sum(v.numel() for v in weights.values()) == 17408  # whole matrices, not one rank's half
    shapes = {tuple(v.shape) for v in weights.values()}
    assert shapes == {(8, 64), (64, 8), (8, 128), (128, 8)}, shapes
    ls = losses(runs.ref)
    assert sum(ls[-2:]) / 2 < sum(ls[:2]) / 2 - 0.03, ls
    memory = torch.load(runs.ref / "memory_logits.pt")
    assert (reload_logits(runs.ref) - memory).abs().max() < 1e-5
    # stopped and resumed under sharding: the same adapter
    assert max_weight_diff(final_weights(runs.cut), weights) == 0.0


@slow
@run_slow
@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_dist_qlora_trains_under_sharding(dist_runs, strategy):
    """bitsandbytes 4-bit base + LoRA on 2 processes (CPU): ZeRO-3 partitions the packed 4-bit storage;
    FSDP2 (accelerate) keeps uint8 4-bit weights out of fully_shard and shards the rest."""
    pytest.importorskip("bitsandbytes")
    runs = dist_runs.get(strategy, kind="qlora")
    ddp = dist_runs.get("ddp", kind="qlora")
    assert all(r["trainable_local_numel"] * 2 == 17408 for r in runtime(runs.ref)["end"])
    a, b = losses(runs.ref), losses(ddp.ref)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert max_weight_diff(final_weights(runs.ref), final_weights(ddp.ref)) < 1e-4
    assert max_weight_diff(final_weights(runs.cut), final_weights(runs.ref)) == 0.0
