"""The per-strategy memory estimate of `affinage plan` against what the ranks really held.

Each rank of the 2-process runs (conftest.DistRuns) counts, storage by storage, the bytes of its
weights and of its optimizer states (+ DeepSpeed's fp32 master partition) at the end of training.
The estimate for the same model, strategy and world size must match them: the weights and
optimizer terms are exact on CPU (fp32). The working-set term (parameters gathered while a layer
runs) is reported separately: at the end of a step nothing is gathered, so it is left out here.
Gradients are freed after each step and activations live inside a step: they are not in this
comparison (their formulas are the unchanged single-GPU ones).
"""

from __future__ import annotations

import pytest
from dist_helpers import STRATEGIES, runtime

from affinage.distributed.memory import GPU_MEMORY_GIB, estimate_memory


def _estimate(runs, strategy: str):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(runs.model_dir))
    total = runtime(runs.get(strategy).ref)["end"][0]["full_numel"]
    layer = (total - 2 * cfg.vocab_size * cfg.hidden_size - cfg.hidden_size) // cfg.num_hidden_layers
    return estimate_memory(
        params_total=total, params_trainable=total, params_linear=0, hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers, vocab=cfg.vocab_size, seq_len=96,
        micro_batch=2, dtype="float32", quantized_4bit=False, optimizer="adamw_torch", gradient_checkpointing=False,
        strategy=strategy, world_size=2, params_layer=layer,
    ), layer, total - layer * cfg.num_hidden_layers


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dist_memory_estimate_matches_measured_model_states(dist_runs, strategy):
    est, layer, root = _estimate(dist_runs, strategy)
    for rank in runtime(dist_runs.get(strategy).ref)["end"]:
        measured = rank["model_state_bytes"]
        working = (root + 2 * layer) * 4 if strategy in ("fsdp2", "zero3") else 0
        assert est.working_set == working
        assert measured["weights"] == est.weights - est.working_set, (measured, est)
        assert measured["optimizer"] == est.optimizer, (measured, est)


def test_dist_memory_orders_the_strategies_as_expected():
    """7B full fine-tune, bf16, 8 GPUs: sharding and offload reduce memory per GPU in the documented order."""
    shape = dict(params_total=6_740_000_000, params_trainable=6_740_000_000, params_linear=6_476_000_000, hidden=4096,
                 intermediate=11008, layers=32, vocab=32000, seq_len=2048, micro_batch=1, dtype="bfloat16",
                 quantized_4bit=False, optimizer="adamw_torch", gradient_checkpointing=True, world_size=8)
    m = {s: estimate_memory(**shape, strategy=s) for s in ("ddp", "zero2", "zero3", "fsdp2", "zero3_offload")}
    assert m["ddp"].total > m["zero2"].total > m["zero3"].total > m["zero3_offload"].total
    assert m["fsdp2"].total < m["zero2"].total
    assert m["zero3_offload"].cpu_offloaded > 0 and m["zero3_offload"].optimizer == 0
    assert m["ddp"].fit("a100-40")[0] == "does not fit"  # 6.7B × (2 + 2 + 4) bytes > 40 GB
    assert m["zero3"].fit("a100-40")[0] == "fits"  # (2 + 2 + 12) bytes / 8 + working set
    assert m["zero3"].activations_full > m["zero3"].activations_checkpointed == m["zero3"].activations
    assert set(GPU_MEMORY_GIB) >= {"h100", "a100-40", "a100-80", "v100-32", "mi250x"}
