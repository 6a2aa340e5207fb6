"""Sharding strategies under the HF Trainer: ddp, fsdp2, zero2, zero3, zero3_offload (and single).

``setup_distributed`` runs in every process before the model is loaded (``train()``'s strategy hook).
It checks the strategy against the launch, starts the process group, renders the strategy's config
(``affinage.distributed.configs``), and prepares what must exist before ``from_pretrained``: under ZeRO-3 a
live ``HfDeepSpeedConfig`` so that the weights are partitioned as they load. The returned
:class:`DistributedSetup` gives the ``TrainingArguments`` keywords and a Trainer subclass.

Launch paths that really run the strategy (measured; see /work/shared/STACK-NOTES.md):

- DeepSpeed goes through ``TrainingArguments(deepspeed=<dict>)``. On CPU ``use_cpu=True`` and
  ``ACCELERATE_USE_CPU`` *unset* (with it set, accelerate silently runs DDP); DeepSpeed's comm layer
  is initialised on the existing process group (otherwise ZeRO-3's load-time partitioning believes
  it runs on one process).
- FSDP2 goes through ``TrainingArguments(fsdp_config={"version": 2, ...})``, accelerate's own FSDP2
  path. Accelerate refuses FSDP on CPU and silently falls back to DDP; here the accelerator state is
  switched to FSDP exactly as accelerate does on a GPU (``AcceleratorState`` and ``PartialState``
  ``distributed_type``, the plugin), so the CPU tests run the GPU code path: ``fully_shard`` per
  decoder layer, DCP sharded checkpoints, gathered final save.

Checkpoints: FSDP2 saves DCP shards (resumable on any world size). DeepSpeed saves ZeRO partitions;
resuming on another world size converts the checkpoint once to DeepSpeed's universal format
(``ds_to_universal``, on rank 0, written inside the checkpoint) and loads it with
``checkpoint.load_universal``. The final model is gathered by every rank into a normal
``save_pretrained`` folder (16-bit on GPU; LoRA: the adapter only).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from affinage.distributed import configs as dcfg
from affinage.errors import UserError
from affinage.recipe.schema import Recipe
from affinage.run import RunDir



class StrategyError(UserError):
    """A strategy that cannot run as launched; ``str()`` says what to do."""


# ----------------------------------------------------------------------------------- process
def launched() -> bool:
    """Whether a launcher (torchrun, SLURM's torchrun) started this process."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def current_rss() -> int:
    """Resident memory of this process now, in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _status_kib(field_name: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS (Linux ≥ 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident memory since the process started or since :func:`reset_peak_rss`, in bytes."""
    return _status_kib("VmHWM") * 1024


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """The environment torchrun --nproc_per_node 1 would give (sharded strategies need a process group)."""
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    )


def init_process_group(on_gpu: bool) -> None:
    """The default process group, before the model loads: gloo on CPU; on GPU NCCL for CUDA tensors and
    gloo for CPU tensors (stop-flag reductions, offloaded states)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")


def finish_distributed() -> None:
    """Barrier then tear down: gloo can abort at exit without it (measured, STACK-NOTES)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


# -------------------------------------------------------------------------------- checkpoints
def checkpoint_kind(path: Path) -> str:
    """``deepspeed``, ``fsdp``, ``plain`` (single/ddp) or ``unknown``: what wrote a checkpoint folder."""
    if any(path.glob("global_step*")):
        return "deepspeed"
    if any(path.glob("pytorch_model_fsdp_*")) or (path / "model.safetensors").exists() and any(path.glob("optimizer_*")):
        return "fsdp"
    if (path / "optimizer.pt").exists() or (path / "model.safetensors").exists() or (path / "adapter_model.safetensors").exists():
        return "plain"
    return "unknown"


STRATEGY_CHECKPOINTS = {"single": "plain", "ddp": "plain", "fsdp2": "fsdp", "zero2": "deepspeed", "zero3": "deepspeed", "zero3_offload": "deepspeed"}


def check_resume_compatible(strategy: str, checkpoint: Path) -> None:
    """A checkpoint resumes only under the family of strategy that wrote it (plain, FSDP, DeepSpeed)."""
    kind = checkpoint_kind(checkpoint)
    want = STRATEGY_CHECKPOINTS[strategy]
    if kind not in (want, "unknown"):
        raise StrategyError(
            f"{checkpoint} was written by a {kind} run, and this recipe uses distributed.strategy {strategy}: resume "
            "with the strategy that wrote it, or start over with --fresh"
        )


def deepspeed_saved_world_size(path: Path) -> Optional[int]:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint (one optimizer shard each)."""
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else None
    folder = path / tag if tag else next(iter(sorted(path.glob("global_step*"))), None)
    if folder is None or not folder.is_dir():
        return None
    shards = list(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return len(shards) or None


def convert_to_universal(path: Path) -> Path:
    """Turn ``checkpoint-N/global_stepN`` into ``global_stepN_universal`` (+ ``latest_universal``), once.

    Runs DeepSpeed's ``ds_to_universal`` in this process (one worker). ``latest_universal`` is
    written last: a half-done conversion is redone on the next attempt.
    """
    import argparse
    import contextlib
    import io
    import shutil

    tag = (path / "latest").read_text().strip()
    out = path / f"{tag}_universal"
    marker = path / "latest_universal"
    if marker.is_file() and marker.read_text().strip() == out.name and out.is_dir():
        return out
    if out.exists():
        shutil.rmtree(out)
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(path / tag), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal(args)
    from affinage.run import atomic_write_text

    atomic_write_text(marker, out.name)
    return out


# ------------------------------------------------------------------------------------- setup
@dataclass
class DistributedSetup:
    """What the strategy hook prepared for one process; see :func:`setup_distributed`."""

    strategy: str
    world_size: int
    on_gpu: bool
    config: dict = field(default_factory=dict)  # {"deepspeed": ...} or {"fsdp_config": ...} or {}
    universal_from: Optional[str] = None  # DeepSpeed checkpoint converted for another world size
    run_dir: Optional[Path] = None
    rss_before_model: int = 0  # this process's resident memory when the hook ran (libraries, data; no model yet)
    _keep_alive: list = field(default_factory=list, repr=False)  # HfDeepSpeedConfig: zero.Init during from_pretrained

    @property
    def deepspeed(self) -> Optional[dict]:
        return self.config.get("deepspeed")

    @property
    def fsdp_config(self) -> Optional[dict]:
        return self.config.get("fsdp_config")

    def training_arguments(self) -> dict:
        """Keywords for ``TrainingArguments`` (they override the Trainer glue's defaults)."""
        if self.deepspeed is not None:
            return {"deepspeed": self.deepspeed, "use_cpu": not self.on_gpu}
        if self.fsdp_config is not None:
            return {"fsdp": True, "fsdp_config": dict(self.fsdp_config)}
        return {}

    def trainer_class(self, base: type) -> type:
        """``base`` (a Trainer class) with the strategy's hooks: FSDP2 on CPU, gathered final save, runtime report."""
        setup = self

        class StrategyTrainer(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                setup._keep_alive.clear()  # the model is loaded; TrainingArguments holds its own DeepSpeed config
                if setup.universal_from is not None:
                    self.add_callback(UnshareOptimizerSteps(self))
                if setup.run_dir is not None:
                    self.add_callback(RuntimeReportCallback(self, setup))

            def create_accelerator_and_postprocess(self):
                super().create_accelerator_and_postprocess()
                if setup.fsdp_config is not None:
                    _force_fsdp2(self)

            def train(self, *args, **kwargs):
                try:
                    return super().train(*args, **kwargs)
                finally:
                    if setup.deepspeed is not None:
                        # transformers builds every later model under zero.Init while a ZeRO-3 config is
                        # registered: a model built on rank 0 only (provenance, model card) would then wait
                        # forever for the other ranks. Training is over: unregister it.
                        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                        unset_hf_deepspeed_config()

            def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
                if self.is_fsdp_enabled and not _internal_call:
                    # every rank takes part in the gather; the main process writes a normal folder
                    state_dict = self.accelerator.get_state_dict(self.model)
                    self._save(output_dir or self.args.output_dir, state_dict=state_dict)
                    return
                super().save_model(output_dir, _internal_call=_internal_call)

        StrategyTrainer.__name__ = StrategyTrainer.__qualname__ = f"{setup.strategy.upper()}{base.__name__}"
        return StrategyTrainer


def _force_fsdp2(trainer) -> None:
    """Make accelerate run its FSDP2 path where it refuses it (CPU): the state switch accelerate does on GPU."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return  # a GPU: accelerate did it itself
    if state.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.NO):
        raise StrategyError(f"FSDP2 requested but accelerate chose {state.distributed_type}; refusing to run another strategy")
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and not torch.cuda.is_available():
        # pinned host memory needs a GPU driver; without a GPU the offload path runs unpinned
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    if plugin.activation_checkpointing and trainer.args.activation_checkpointing:
        raise StrategyError("FSDP activation checkpointing and training.gradient_checkpointing are both on: keep one")


def setup_distributed(
    recipe: Recipe,
    run_dir: Optional[Path] = None,
    *,
    world_size: int,
    accumulation: int,
    resume_from: Optional[str] = None,
) -> DistributedSetup:
    """The strategy hook: call in every process before the model is loaded."""
    d = recipe.distributed
    s = d.strategy
    on_gpu = torch.cuda.is_available()
    if s == "single" and world_size > 1:
        raise StrategyError(
            f"distributed.strategy: single but {world_size} processes were launched: run one process, or choose ddp/fsdp2/zero*"
        )
    if d.sharded and not launched():
        if world_size > 1:
            raise StrategyError("WORLD_SIZE > 1 without a launcher: use `affinage train --nproc N` or torchrun")
        _single_process_env()  # as torchrun --nproc_per_node 1 would: FSDP2 and DeepSpeed need a process group
    if s in dcfg.ZERO_STAGE:
        # accelerate treats ACCELERATE_USE_CPU=1 as "no DeepSpeed" and silently runs DDP (STACK-NOTES)
        os.environ.pop("ACCELERATE_USE_CPU", None)
        if not on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if world_size > 1 or d.sharded:
        init_process_group(on_gpu)

    hidden = dcfg.model_hidden_size(recipe) if s in dcfg.ZERO_STAGE else None
    config = dcfg.render(recipe, world_size=world_size, accumulation=accumulation, on_gpu=on_gpu, hidden_size=hidden)
    setup = DistributedSetup(strategy=s, world_size=world_size, on_gpu=on_gpu, config=config, run_dir=run_dir,
                             rss_before_model=current_rss())

    if resume_from:
        check_resume_compatible(s, Path(resume_from))
        if s in dcfg.ZERO_STAGE:
            saved = deepspeed_saved_world_size(Path(resume_from))
            if saved is not None and saved != world_size:
                import torch.distributed as dist

                if rank() == 0:
                    print(f"affinage: {resume_from} was written by {saved} process(es), resuming on {world_size}: "
                          "converting it to a DeepSpeed universal checkpoint")
                    convert_to_universal(Path(resume_from))
                if dist.is_initialized():
                    dist.barrier()
                setup.config["deepspeed"]["checkpoint"] = {"load_universal": True}
                setup.universal_from = resume_from

    if s in dcfg.ZERO_STAGE:
        import deepspeed

        # the process group exists already (init_process_group above): DeepSpeed wraps it
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
        if dcfg.ZERO_STAGE[s] == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # alive until the model is loaded: from_pretrained partitions each weight as it is read
            setup._keep_alive.append(HfDeepSpeedConfig(setup.config["deepspeed"]))
    if s == "fsdp2" and setup.fsdp_config.get("cpu_ram_efficient_loading"):
        # read by from_pretrained: ranks other than 0 load on the meta device, rank 0 broadcasts the shards
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"

    if run_dir is not None and rank() == 0 and setup.config:
        from affinage.run import atomic_write_json

        folder = RunDir(Path(run_dir)).distributed
        folder.mkdir(parents=True, exist_ok=True)
        name = "deepspeed.json" if setup.deepspeed is not None else "fsdp_config.json"
        atomic_write_json(folder / name, next(iter(setup.config.values())))
    return setup


# --------------------------------------------------------------------------- runtime report
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

    def __init__(self, trainer, setup: DistributedSetup):
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

        folder = RunDir(Path(self.setup.run_dir)).distributed
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RunDir(Path(self.setup.run_dir)).runtime, {
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
    return json.loads(RunDir(Path(run_dir)).runtime.read_text())
