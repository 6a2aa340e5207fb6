"""The same recipe through `affinage submit --cluster local --nodes 2`: one torchrun per node, c10d.

The local SLURM cluster (slurm/local-cluster.sh) has two nodes with one CPU each: each job runs one
process per node, so these runs are multi-node (rendezvous over TCP, LOCAL_RANK 0 on both). The job
script is the rendered template that Jean Zay jobs use (ACCELERATE_USE_CPU=1 exported on CPU).
"""

from __future__ import annotations

import json

import pytest
from dist_helpers import STRATEGIES, final_weights, losses, max_weight_diff, needs, run_slow, runtime, slow, write_recipe

from affinage.slurm.status import read_events, wait_for_job
from affinage.slurm.submit import submit


@pytest.mark.parametrize("strategy", [s if s == "fsdp2" else pytest.param(s, marks=[slow, run_slow]) for s in STRATEGIES])
def test_dist_strategy_through_slurm_on_two_nodes(local_cluster, dist_runs, tmp_path, strategy):
    needs(strategy)
    recipe = write_recipe(tmp_path / "recipe", dist_runs.model_dir, dist_runs.data, strategy=strategy)
    run = tmp_path / "run"
    result = submit(recipe, "local", nodes=2, run_dir=run, time="00:15:00")
    try:
        wait_for_job(result.job_ids["train"], timeout=600)
    except Exception:
        logs = "\n".join(p.read_text()[-3000:] for p in (run / "slurm").glob("train-*.out"))
        raise AssertionError(f"SLURM training job failed:\n{logs}") from None
    started = [e for e in read_events(run) if e["event"] == "started"][0]
    assert "," in started["nodes"] or "[" in started["nodes"], started  # two nodes in the allocation
    report = runtime(run)
    assert report["world_size"] == 2 and [r["num_processes"] for r in report["end"]] == [2, 2]
    if strategy in ("fsdp2", "zero3"):
        assert all(r["local_numel"] * 2 == r["full_numel"] for r in report["end"])
    ls = losses(run)
    assert len(ls) == 6 and ls[-1] < ls[0]
    assert json.loads((run / "summary.json").read_text())["completed"]
    # the same training as the direct 2-process launch (same thread count per process: 1)
    ref = dist_runs.get(strategy).ref
    assert max(abs(a - b) for a, b in zip(ls, losses(ref))) < 1e-5
    assert max_weight_diff(final_weights(run), final_weights(ref)) < 1e-5
