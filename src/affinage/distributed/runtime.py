"""The runtime report of a distributed run (RUN_DIR/distributed/runtime.json): what really ran.

Launchers fail silently (STACK-NOTES: FSDP on CPU runs DDP, torchrun without CPU mode runs
independent trainings), so every rank records its world size, placements, local vs full parameter
counts, optimizer chain and memory; the distributed tests assert on this file, not on exit codes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from affinage.distributed.process import current_rss, peak_rss, rank, reset_peak_rss

DIST_DIR = "distributed"  # RUN_DIR/distributed/: rendered config, runtime report
RUNTIME_FILE = "runtime.json"

def _reshard(model) -> None:
    """FSDP2 leaves the root unit gathered after a forward without backward (eval): shard it back before measuring."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _device_name(offload) -> Optional[str]:
    """``cpu``/``nvme`` for a DeepSpeed offload section, None when there is none."""
    device = getattr(offload, "device", None)
    device = getattr(device, "value", device)
    return None if device in (None, "none") else str(device)


def _local_numel(p) -> int:
    if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
        return int(p.ds_tensor.numel())
    if hasattr(p, "to_local"):  # FSDP2 DTensor
        return int(p.to_local().numel())
    return int(p.numel())


def _full_numel(p) -> int:
    return int(getattr(p, "ds_numel", None) or p.numel())


def _placements(p) -> Optional[list[str]]:
    pl = getattr(p, "placements", None)
    return [str(x) for x in pl] if pl is not None else None


def _checksum(model) -> float:
    """Sum of this rank's (local) trainable values: equal across DDP ranks, different across shards."""
    total = 0.0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        t = p.ds_tensor if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p)
        total += float(t.detach().double().sum())
    return total


def _storages(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel():
            if hasattr(t, "to_local"):
                t = t.to_local()
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _optimizer_chain(opt) -> list:
    """The optimizer and what it wraps (accelerate → DeepSpeed ZeRO optimizer → torch AdamW)."""
    chain, seen = [], set()
    while opt is not None and id(opt) not in seen:
        chain.append(opt)
        seen.add(id(opt))
        opt = getattr(opt, "optimizer", None)
    return chain


def model_state_bytes(trainer) -> dict:
    """Bytes this rank holds for weights and for optimizer states (+ DeepSpeed fp32 master partitions).

    Counted storage by storage (a tensor viewing a flat buffer counts the buffer once): ZeRO-3
    partitions (``ds_tensor``), FSDP2 local shards, torch optimizer ``state`` tensors, DeepSpeed's
    ``single_partition_of_fp32_groups`` (ZeRO-2) / ``fp32_partitioned_groups_flat`` (ZeRO-3).
    """
    weights = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in trainer.model.parameters()]
    states: list = []
    for o in _optimizer_chain(trainer.optimizer):
        if isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                states += [v for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            states += [t for t in (getattr(o, name, None) or []) if torch.is_tensor(t)]
    return {"weights": _storages(weights), "optimizer": _storages(states)}


class UnshareOptimizerSteps(TrainerCallback):
    """Work around DeepSpeed 0.19.8's ZeRO-3 universal-checkpoint load (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``).

    It gives every parameter sub-group the *same* ``step`` tensor; torch AdamW increments it in
    place once per sub-group, so after a resume on another world size the bias corrections run ahead
    (measured: norm weights off by 1e-4 after one step, losses off by 2e-3 two steps later). Each
    sub-group gets its own copy before the first step; with it, 2 → 1 resumes match to ~1e-7.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        seen: set[int] = set()
        for o in _optimizer_chain(self.trainer.optimizer):
            if isinstance(o, torch.optim.Optimizer):
                for st in o.state.values():
                    step = st.get("step")
                    if torch.is_tensor(step):
                        if id(step) in seen:
                            st["step"] = step.clone()
                        seen.add(id(st["step"]))
        return control


class RuntimeReportCallback(TrainerCallback):
    """Writes RUN_DIR/distributed/runtime.json at train begin/end: what really ran, per rank.

    World size, the engine that wraps the model (``DeepSpeedEngine``, an ``FSDP…`` class, DDP), the
    ZeRO stage, the optimizer classes, local vs full parameter counts, DTensor placements, a
    checksum of local trainable values (equal across DDP ranks), bytes of model states, peak RSS.
    Tests read it to assert the effect of a strategy, never an exit code.
    """

    def __init__(self, trainer, setup):  # setup: a strategies.DistributedSetup (strategies imports this module)
        self.trainer = trainer
        self.setup = setup
        self.begin: Optional[dict] = None
        self._begin_step: Optional[int] = None

    def _rank_info(self) -> dict:
        import resource

        tr = self.trainer
        model = tr.model
        wrapped = tr.model_wrapped
        _reshard(model)
        params = list(model.parameters())
        sample = next((p for p in params if p.requires_grad and p.dim() == 2), params[0])
        opt = tr.optimizer
        inner = getattr(opt, "optimizer", None)
        info = {
            "rank": rank(),
            "engine": type(wrapped).__name__,
            "model_class": type(model).__name__,
            "zero_stage": wrapped.zero_optimization_stage() if hasattr(wrapped, "zero_optimization_stage") else None,
            "zero_offload": {
                "optimizer": _device_name(wrapped.zero_offload_optimizer()),
                "param": _device_name(wrapped.zero_offload_param()),
            } if hasattr(wrapped, "zero_offload_optimizer") else None,
            "optimizer": type(opt).__name__ if opt is not None else None,
            "inner_optimizer": type(inner).__name__ if inner is not None else None,
            "innermost_optimizer": type(getattr(inner, "optimizer", None)).__name__ if getattr(inner, "optimizer", None) is not None else None,
            "distributed_type": str(tr.accelerator.distributed_type),
            "fsdp_offload": type(getattr(getattr(tr.accelerator.state, "fsdp_plugin", None), "cpu_offload", None)).__name__
            if getattr(tr.accelerator.state, "fsdp_plugin", None) is not None else None,
            "num_processes": tr.accelerator.num_processes,
            "local_numel": sum(_local_numel(p) for p in params),
            "full_numel": sum(_full_numel(p) for p in params),
            "trainable_local_numel": sum(_local_numel(p) for p in params if p.requires_grad),
            "sample_param": {"class": type(sample).__name__, "placements": _placements(sample),
                             "local_shape": list(sample.to_local().shape) if hasattr(sample, "to_local") else None,
                             "full_shape": list(getattr(sample, "ds_shape", None) or sample.shape)},
            "checksum": _checksum(model),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before_model": self.setup.rss_before_model,
            "rss_now": current_rss(),
            "peak_rss_training": peak_rss() if getattr(self, "_peak_reset", False) else None,
        }
        try:
            info["model_state_bytes"] = model_state_bytes(tr)
        except Exception as e:  # noqa: BLE001 - a report, never a reason to stop training
            info["model_state_bytes"] = {"error": str(e)}
        if torch.cuda.is_available():
            info["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        return info

    def _gather(self) -> list[dict]:
        import torch.distributed as dist

        try:
            mine = self._rank_info()
        except Exception as e:  # noqa: BLE001 - every rank must reach the gather below
            mine = {"rank": rank(), "error": f"{type(e).__name__}: {e}"}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            out: list = [None] * dist.get_world_size()
            dist.all_gather_object(out, mine)
            return out
        return [mine]

    def _write(self, ranks_begin: list[dict], ranks_end: Optional[list[dict]], state) -> None:
        if rank() != 0 or self.setup.run_dir is None:
            return
        from affinage.run import atomic_write_json

        folder = Path(self.setup.run_dir) / DIST_DIR
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / RUNTIME_FILE, {
            "strategy": self.setup.strategy,
            "world_size": self.setup.world_size,
            "on_gpu": self.setup.on_gpu,
            "universal_from": self.setup.universal_from,
            "global_step_begin": self._begin_step,
            "global_step_end": state.global_step if ranks_end is not None else None,
            "begin": ranks_begin,
            "end": ranks_end,
        })

    def on_train_begin(self, args, state, control, **kwargs):
        self._begin_step = state.global_step
        self.begin = self._gather()
        self._write(self.begin, None, state)
        # from here on, the peak covers the training steps only (not loading, not the final save)
        self._peak_reset = reset_peak_rss()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._write(self.begin or [], self._gather(), state)
        return control


def read_runtime(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / DIST_DIR / RUNTIME_FILE).read_text())

