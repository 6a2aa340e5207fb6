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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from affinage.distributed import configs as dcfg
from affinage.distributed.checkpoints import check_resume_compatible, convert_to_universal, deepspeed_saved_world_size
from affinage.distributed.configs import StrategyError
from affinage.distributed.process import single_process_env, current_rss, init_process_group, launched, rank
from affinage.distributed.runtime import DIST_DIR, RuntimeReportCallback, UnshareOptimizerSteps
from affinage.recipe.schema import Recipe

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
        single_process_env()  # as torchrun --nproc_per_node 1 would: FSDP2 and DeepSpeed need a process group
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

        folder = Path(run_dir) / DIST_DIR
        folder.mkdir(parents=True, exist_ok=True)
        name = "deepspeed.json" if setup.deepspeed is not None else "fsdp_config.json"
        atomic_write_json(folder / name, next(iter(setup.config.values())))
    return setup


