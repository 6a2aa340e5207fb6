"""Resuming on another number of processes: 2 → 1 (and 1 → 2) for FSDP2 and DeepSpeed.

The checkpoint written at step 3 by the 2-process reference run (conftest.DistRuns) is copied into a
fresh run directory and resumed with ``affinage train --nproc 1``. The global batch stays the same
(accumulation 1 → 2) and the sampler gives the same sequences, so the run ends on the reference's
model up to float reduction order: one process sums two micro-batch gradients where two processes
all-reduce two; measured differences are ~1e-7 on the weights, asserted < 1e-5.

FSDP2 checkpoints are torch.distributed.checkpoint shards, re-sharded on load. DeepSpeed's ZeRO
partitions are converted once to a universal checkpoint (``global_stepN_universal`` next to the
original, inside the checkpoint) and loaded with ``checkpoint.load_universal``.
"""

from __future__ import annotations

import pytest
from dist_helpers import (
    copy_checkpoint,
    final_weights,
    launch_cli,
    losses,
    max_weight_diff,
    needs,
    run_slow,
    runtime,
    slow,
    write_recipe,
)

TOLERANCE = 1e-5  # see the module doc: reduction order only


def _check_resumed(run, ref, strategy: str, world_size: int, step: int = 3) -> None:
    report = runtime(run)
    assert report["world_size"] == world_size and report["global_step_begin"] == step
    assert [r["num_processes"] for r in report["end"]] == [world_size] * world_size
    if strategy in ("zero2", "zero3"):
        assert report["universal_from"].endswith(f"checkpoint-{step}")
        assert (run / "checkpoints" / f"checkpoint-{step}" / f"global_step{step}_universal").is_dir()
        assert report["end"][0]["engine"] == "DeepSpeedEngine"
    a, b = losses(run), losses(ref)
    assert len(a) == len(b) == 6
    assert a[:step] == b[:step]  # the metrics of the first session are kept
    assert max(abs(x - y) for x, y in zip(a[step:], b[step:])) < TOLERANCE, (a, b)
    assert max_weight_diff(final_weights(run), final_weights(ref)) < TOLERANCE


@pytest.mark.parametrize("strategy", [
    "fsdp2", "zero3",
    pytest.param("zero2", marks=[slow, run_slow]),
    pytest.param("ddp", marks=[slow, run_slow]),
])
def test_dist_resume_two_processes_on_one(dist_runs, tmp_path, strategy):
    runs = dist_runs.get(strategy)
    run = tmp_path / "run"
    copy_checkpoint(runs.ref, 3, run)
    out = launch_cli(runs.recipe, 1, run)
    assert "resuming from" in out.stdout + out.stderr
    _check_resumed(run, runs.ref, strategy, 1)


@slow
@run_slow
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_dist_resume_one_process_on_two(tmp_path, tiny_llama_dir, demo_data, strategy):
    needs(strategy)
    recipe = write_recipe(tmp_path, tiny_llama_dir, demo_data / "droit.jsonl", strategy=strategy)
    one = tmp_path / "one"
    launch_cli(recipe, 1, one)
    assert runtime(one)["world_size"] == 1
    run = tmp_path / "two"
    copy_checkpoint(one, 3, run)
    launch_cli(recipe, 2, run)
    _check_resumed(run, one, strategy, 2)


def test_dist_resume_with_another_strategy_is_refused(tmp_path):
    """A DeepSpeed checkpoint resumed under FSDP2 would fail deep in a loader: say so before loading.

    The folders mimic what each strategy writes (file names as in the runs of test_dist_strategies).
    """
    from affinage.distributed.checkpoints import StrategyError, check_resume_compatible, checkpoint_kind

    layouts = {
        "deepspeed": ["global_step3/zero_pp_rank_0_mp_rank_00_optim_states.pt", "latest", "trainer_state.json"],
        "fsdp": ["pytorch_model_fsdp_0/__0_0.distcp", "optimizer_0/__0_0.distcp", "trainer_state.json"],
        "plain": ["model.safetensors", "optimizer.pt", "trainer_state.json"],
    }
    for kind, files in layouts.items():
        for f in files:
            (tmp_path / kind / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / kind / f).touch()
        assert checkpoint_kind(tmp_path / kind) == kind
    check_resume_compatible("zero2", tmp_path / "deepspeed")  # same family: fine
    check_resume_compatible("single", tmp_path / "plain")
    with pytest.raises(StrategyError, match="written by a deepspeed run.*fsdp2.*--fresh"):
        check_resume_compatible("fsdp2", tmp_path / "deepspeed")
    with pytest.raises(StrategyError, match="written by a fsdp run.*zero3"):
        check_resume_compatible("zero3", tmp_path / "fsdp")
    with pytest.raises(StrategyError, match="written by a plain run"):
        check_resume_compatible("fsdp2", tmp_path / "plain")
