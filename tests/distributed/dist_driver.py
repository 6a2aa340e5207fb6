"""Runs inside every process of a torchrun launch (tests/distributed): several trainings in one process group.

Starting Python with transformers costs ~12 s per process on 2 cores, so one launch does what a
test needs: ``--ref DIR`` an uninterrupted run; ``--cut DIR`` the same recipe stopped at a step
(through RUN_DIR/STOP, as SLURM does) then resumed in the same processes. After the last training
the model still in memory scores a fixed input on every rank (ZeRO-3/FSDP2 gather as they run);
rank 0 writes those logits, so the test can compare them with ``final/`` reloaded by plain
transformers. Results go to ``--out`` as JSON (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from affinage.cli import _quiet_libraries

PROBE = torch.arange(5, 45).unsqueeze(0)  # token ids < the tiny vocabulary (1024)


class StopAt(TrainerCallback):
    def __init__(self, stop_file: Path, step: int):
        self.stop_file, self.step = stop_file, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step and int(os.environ.get("RANK", "0")) == 0:
            self.stop_file.touch()


class Logits(TrainerCallback):
    """The in-memory model's logits on PROBE at the end of a completed training (all ranks run it)."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step < state.max_steps:
            return
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(input_ids=PROBE, use_cache=False).logits.float()
        model.train(was)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(out, self.path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("--ref")
    p.add_argument("--cut")
    p.add_argument("--stop-at", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    _quiet_libraries()
    from affinage.distributed.process import finish_distributed
    from affinage.recipe.loader import load_recipe
    from affinage.run import RunDir
    from affinage.train.tasks import train
    from affinage.train.trainer import STOP_FILE, world_size_from_env

    results: dict = {}
    for name, folder in (("ref", a.ref), ("cut", a.cut)):
        if not folder:
            continue
        recipe = load_recipe(a.recipe, overrides=[*a.set, f"output.dir={folder}"], world_size=world_size_from_env())
        run = RunDir.create(recipe.run_dir())
        if name == "cut":
            first = train(recipe, run, callbacks=[StopAt(run.root / STOP_FILE, a.stop_at)])
            results["cut_first"] = first.as_dict()
        last = train(recipe, run, callbacks=[Logits(run.root / "memory_logits.pt")])
        results[name] = last.as_dict()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(a.out).write_text(json.dumps(results, indent=1))
    finish_distributed()


if __name__ == "__main__":
    main()
