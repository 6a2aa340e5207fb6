"""The DeepSpeed and FSDP2 configuration of a run: a readable file, filled from the recipe.

A strategy starts from a file a researcher can read, copy and edit: the shipped
``deepspeed/<strategy>.json`` for ``zero2``/``zero3``/``zero3_offload``, ``accelerate/fsdp2.yaml`` for
``fsdp2`` (package data, :mod:`affinage.resources`; ``configs/`` in a checkout), or the recipe's own
``distributed.config`` (a path to the user's file). Values the recipe owns are never written by hand in those files:

- DeepSpeed: ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``train_batch_size``,
  ``gradient_clipping``, ``bf16.enabled``/``fp16.enabled``, the optimizer's ``lr``/``betas``/``eps``/
  ``weight_decay``, ``zero_optimization.stage`` and the offload sections (from ``distributed``). In a
  file they are absent or ``"auto"``; any other value is refused with the recipe key to change
  instead, so that an "auto" mismatch between DeepSpeed and the Trainer cannot happen. A
  ``scheduler`` section is refused (``training.lr_scheduler`` is the schedule).
- The size-dependent ``"auto"`` values of ZeRO (bucket sizes, persistence threshold) are computed
  from the model's ``hidden_size`` exactly as transformers would.

The filled DeepSpeed config is checked by DeepSpeed's own parser (``DeepSpeedConfig``) before any
process starts, and written to ``RUN_DIR/distributed/`` so that what ran can be read.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any, Optional

from affinage.errors import UserError
from affinage.recipe.schema import Recipe
from affinage.paths import expand
from affinage.resources import resource_dir, resource_path
from affinage.sharding import STRATEGY_TABLE
from affinage import hardware

ZERO_STAGE = {name: s.zero_stage for name, s in STRATEGY_TABLE.items() if s.deepspeed}  # from the one table
ADAM_EPS = 1e-8  # TrainingArguments' default adam_epsilon (the recipe has no key for it)


class DistributedConfigError(UserError):
    """A distributed config file that cannot be used with this recipe; ``str()`` says what to change."""


class StrategyError(UserError):
    """A strategy that cannot run as launched; ``str()`` says what to do."""


def default_config_path(strategy: str) -> Optional[Path]:
    """The shipped file a strategy starts from (None for ddp/single)."""
    if strategy in ZERO_STAGE:
        return resource_path("deepspeed", strategy)
    if strategy == "fsdp2":
        return resource_path("accelerate", "fsdp2")
    return None


def config_path(recipe: Recipe) -> Optional[Path]:
    d = recipe.distributed
    if d.config:
        return expand(d.config)
    return default_config_path(d.strategy)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise DistributedConfigError(f"distributed.config {path}: no such file (shipped files: {resource_dir('deepspeed')}, {resource_dir('accelerate')})")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one clear message
        raise DistributedConfigError(f"{path}: cannot parse the file ({e})") from None
    if not isinstance(data, dict):
        raise DistributedConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def use_bf16(recipe: Recipe, on_gpu: bool) -> bool:
    """bf16 training for this recipe (the one rule: ``affinage.hardware.use_bf16``)."""
    return hardware.use_bf16(recipe.model.dtype, on_gpu)


# ---------------------------------------------------------------------------------- DeepSpeed
def _owned(cfg: dict, dotted: str, value: Any, recipe_key: str, path: Path) -> None:
    """Set ``dotted`` to the recipe's ``value``; a hand-written different value is an error."""
    parts = dotted.split(".")
    node = cfg
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise DistributedConfigError(f"{path}: {'.'.join(parts[:-1])} must be a mapping")
    current = node.get(parts[-1], "auto")
    if current != "auto" and current != value:
        raise DistributedConfigError(
            f"{path}: {dotted} is {current!r} but the recipe owns this value ({recipe_key} gives {value!r}): "
            f"remove the key or write \"auto\", and change {recipe_key} in the recipe instead"
        )
    node[parts[-1]] = value


def _auto_sizes(zero: dict, hidden: Optional[int]) -> None:
    """ZeRO sizes that depend on the model, as transformers computes them for "auto".

    Kept here rather than calling transformers because transformers fills them only inside
    ``HfTrainerDeepSpeedConfig.trainer_config_finalize``, which needs the built model and the
    TrainingArguments; ``plan`` and the pre-launch check (DeepSpeed's own parser) need the file
    before any model exists. ``tests/distributed/test_dist_configs.py`` compares the two, so a change
    in transformers' formula fails a test instead of drifting.
    """
    h = hidden or 4096
    fills = {
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
    }
    for key, value in fills.items():
        if zero.get(key) == "auto":
            zero[key] = value


def render_deepspeed_config(
    recipe: Recipe,
    *,
    world_size: int,
    accumulation: int,
    on_gpu: bool,
    hidden_size: Optional[int] = None,
) -> dict:
    """The DeepSpeed config of this recipe on ``world_size`` processes: the strategy's file, recipe values filled in."""
    d = recipe.distributed
    t = recipe.training
    if d.strategy not in ZERO_STAGE:
        raise ValueError(f"{d.strategy} is not a DeepSpeed strategy")
    path = config_path(recipe)
    cfg = copy.deepcopy(_read(path))

    if "scheduler" in cfg:
        raise DistributedConfigError(
            f"{path}: a scheduler section would replace the recipe's schedule: remove it and set training.lr_scheduler / "
            "training.warmup_steps in the recipe"
        )
    zero = cfg.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DistributedConfigError(f"{path}: zero_optimization must be a mapping")
    stage = ZERO_STAGE[d.strategy]
    if zero.get("stage", stage) != stage:
        raise DistributedConfigError(
            f"{path}: zero_optimization.stage is {zero['stage']} but distributed.strategy is {d.strategy} (stage {stage}): "
            "choose the strategy in the recipe and leave the stage to it"
        )
    zero["stage"] = stage

    if recipe.model.dtype == "float16":
        raise DistributedConfigError(
            "model.dtype float16 with a DeepSpeed strategy: fp16 needs a loss scaler affinage does not configure; "
            "use bfloat16 (or auto)"
        )
    _owned(cfg, "train_micro_batch_size_per_gpu", t.micro_batch_size, "training.micro_batch_size", path)
    _owned(cfg, "gradient_accumulation_steps", accumulation, "training.global_batch_size / (micro × processes)", path)
    _owned(cfg, "train_batch_size", t.micro_batch_size * accumulation * world_size, "training.global_batch_size", path)
    _owned(cfg, "gradient_clipping", t.max_grad_norm, "training.max_grad_norm", path)
    bf16 = use_bf16(recipe, on_gpu)
    _owned(cfg, "bf16.enabled", bf16, "model.dtype", path)
    _owned(cfg, "fp16.enabled", False, "model.dtype", path)

    # offload: the recipe's flags win when written; otherwise the file's sections stay as they are
    offload_opt, offload_params = d.offloads()
    if d.offload_optimizer is not None or d.strategy == "zero3_offload":
        if offload_opt:
            zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": True})
            zero["offload_optimizer"]["device"] = "cpu"
        else:
            zero.pop("offload_optimizer", None)
    if d.offload_params is not None or d.strategy == "zero3_offload":
        if offload_params:
            zero.setdefault("offload_param", {"device": "cpu", "pin_memory": True})
            zero["offload_param"]["device"] = "cpu"
        else:
            zero.pop("offload_param", None)
    if stage == 2 and zero.get("offload_param", {}).get("device", "none") != "none":
        raise DistributedConfigError(f"{path}: zero_optimization.offload_param needs ZeRO-3 (strategy zero3/zero3_offload)")
    if not on_gpu:
        # pinned memory needs a GPU driver; on CPU the offload target is the same RAM anyway
        for section in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(section), dict):
                zero[section]["pin_memory"] = False

    offloading_optimizer = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    if offloading_optimizer and "optimizer" not in cfg:
        # DeepSpeed refuses a client (torch) optimizer with ZeRO-Offload: its CPU Adam runs the step
        cfg["optimizer"] = {"type": "AdamW", "params": {}}
    if "optimizer" in cfg:
        opt = cfg["optimizer"]
        if t.optimizer not in ("adamw_torch", "adamw_torch_fused"):
            raise DistributedConfigError(
                f"training.optimizer {t.optimizer} with a DeepSpeed optimizer section ({path}"
                f"{', needed by optimizer offload' if offloading_optimizer else ''}): only AdamW maps onto DeepSpeed's "
                "optimizers; use adamw_torch, or turn the optimizer offload off"
            )
        if str(opt.get("type", "AdamW")).lower() not in ("adamw", "adam"):
            raise DistributedConfigError(f"{path}: optimizer.type {opt.get('type')!r}: the recipe trains with AdamW; write AdamW")
        opt["type"] = "AdamW"
        opt.setdefault("params", {})
        _owned(cfg, "optimizer.params.lr", t.learning_rate, "training.learning_rate", path)
        _owned(cfg, "optimizer.params.betas", [t.adam_beta1, t.adam_beta2], "training.adam_beta1/adam_beta2", path)
        _owned(cfg, "optimizer.params.eps", ADAM_EPS, "(TrainingArguments default)", path)
        _owned(cfg, "optimizer.params.weight_decay", t.weight_decay, "training.weight_decay", path)

    if stage == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            raise DistributedConfigError(
                f"{path}: stage3_gather_16bit_weights_on_model_save is false: affinage saves final/ as a normal "
                "save_pretrained folder gathered from every rank; remove the key or set it true"
            )
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    _auto_sizes(zero, hidden_size)
    left = _autos(cfg)
    if left:
        raise DistributedConfigError(f"{path}: \"auto\" left for keys affinage does not fill: {', '.join(left)}; write values")
    return cfg


def _autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        out: list[str] = []
        for k, v in node.items():
            out += _autos(v, f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if node == "auto" else []


def check_deepspeed_config(cfg: dict, *, world_size: int) -> None:
    """Run DeepSpeed's own parser on ``cfg`` (without starting anything); errors become one clear message.

    Outside a process group DeepSpeed assumes one process, so the batch triple is checked here
    (``train_batch_size = micro × accumulation × world_size``) and DeepSpeed checks everything else.
    """
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        raise DistributedConfigError(
            "DeepSpeed is not installed: pip install 'affinage[deepspeed]' (or choose distributed.strategy: fsdp2/ddp)"
        ) from None
    micro, acc, total = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]
    if micro * acc * world_size != total:
        raise DistributedConfigError(f"train_batch_size {total} != {micro} × {acc} × {world_size} processes")
    probe = copy.deepcopy(cfg)
    probe.pop("train_batch_size")
    try:
        DeepSpeedConfig(probe)
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises assertion/pydantic/value errors
        text = str(e).strip().splitlines()
        raise DistributedConfigError("DeepSpeed refuses the config: " + " ".join(text[:6])) from None


# ----------------------------------------------------------------------------------- FSDP2
# accelerate config key (fsdp_config) -> TrainingArguments.fsdp_config key
FSDP_KEYS = {
    "fsdp_version": "version",
    "fsdp_auto_wrap_policy": "auto_wrap_policy",
    "fsdp_transformer_layer_cls_to_wrap": "transformer_layer_cls_to_wrap",
    "fsdp_min_num_params": "min_num_params",
    "fsdp_reshard_after_forward": "reshard_after_forward",
    "fsdp_state_dict_type": "state_dict_type",
    "fsdp_cpu_ram_efficient_loading": "cpu_ram_efficient_loading",
    "fsdp_offload_params": "cpu_offload",
    "fsdp_activation_checkpointing": "activation_checkpointing",
}
# top-level keys of an accelerate config file that the launcher or the recipe sets instead (read, not used)
LAUNCHER_KEYS = {
    "compute_environment", "distributed_type", "num_processes", "num_machines", "machine_rank", "main_process_ip",
    "main_process_port", "rdzv_backend", "same_network", "main_training_function", "use_cpu", "downcast_bf16",
    "debug", "enable_cpu_affinity", "gpu_ids", "tpu_env", "tpu_use_cluster", "tpu_use_sudo", "dynamo_config",
    "mixed_precision",
}


def render_fsdp_config(recipe: Recipe, *, on_gpu: bool) -> dict:
    """``TrainingArguments.fsdp_config`` for FSDP2, from the accelerate YAML file and the recipe."""
    d = recipe.distributed
    path = config_path(recipe)
    data = _read(path)
    unknown = sorted(set(data) - LAUNCHER_KEYS - {"fsdp_config"})
    if unknown:
        raise DistributedConfigError(f"{path}: unknown accelerate key(s) {', '.join(unknown)}")
    if data.get("distributed_type", "FSDP") != "FSDP":
        raise DistributedConfigError(f"{path}: distributed_type is {data['distributed_type']!r}; an FSDP2 file says FSDP")
    mp = data.get("mixed_precision")
    want = "bf16" if use_bf16(recipe, on_gpu) else "no"
    if mp not in (None, "auto") and on_gpu and mp != want:
        raise DistributedConfigError(
            f"{path}: mixed_precision is {mp!r} but the recipe's model.dtype gives {want!r}: remove the key and set model.dtype"
        )
    raw = data.get("fsdp_config") or {}
    if not isinstance(raw, dict):
        raise DistributedConfigError(f"{path}: fsdp_config must be a mapping")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key if key.startswith("fsdp_") else f"fsdp_{key}"
        if name not in FSDP_KEYS:
            close = difflib.get_close_matches(name, FSDP_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(FSDP_KEYS)}"
            raise DistributedConfigError(f"{path}: fsdp_config.{key} is not an FSDP2 setting affinage passes on.{hint}")
        out[FSDP_KEYS[name]] = value
    if int(out.get("version", 2)) != 2:
        raise DistributedConfigError(f"{path}: fsdp_version {out['version']}: strategy fsdp2 uses FSDP version 2")
    out["version"] = 2
    out.setdefault("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
    out.setdefault("reshard_after_forward", True)
    out.setdefault("state_dict_type", "SHARDED_STATE_DICT")
    if out["state_dict_type"] not in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        raise DistributedConfigError(f"{path}: fsdp_state_dict_type must be SHARDED_STATE_DICT or FULL_STATE_DICT")
    if d.offload_params is not None:
        out["cpu_offload"] = bool(d.offload_params)
    out["cpu_offload"] = bool(out.get("cpu_offload", False))
    out["activation_checkpointing"] = bool(out.get("activation_checkpointing", False))
    out["cpu_ram_efficient_loading"] = bool(out.get("cpu_ram_efficient_loading", False))
    if out["activation_checkpointing"] and recipe.training.gradient_checkpointing:
        raise DistributedConfigError(
            f"{path}: fsdp_activation_checkpointing and the recipe's training.gradient_checkpointing are both on: "
            "keep one (FSDP's avoids a redundant all-gather in backward)"
        )
    return out


def render(recipe: Recipe, *, world_size: int, accumulation: int, on_gpu: bool, hidden_size: Optional[int] = None) -> dict:
    """``{"deepspeed": cfg}`` or ``{"fsdp_config": cfg}`` (or ``{}``), checked; DeepSpeed's parser included."""
    s = recipe.distributed.strategy
    if s in ZERO_STAGE:
        cfg = render_deepspeed_config(recipe, world_size=world_size, accumulation=accumulation, on_gpu=on_gpu, hidden_size=hidden_size)
        check_deepspeed_config(cfg, world_size=world_size)
        return {"deepspeed": cfg}
    if s == "fsdp2":
        return {"fsdp_config": render_fsdp_config(recipe, on_gpu=on_gpu)}
    return {}


def model_hidden_size(recipe: Recipe) -> Optional[int]:
    """``hidden_size`` from the model's config.json (no weights read), None when it cannot be found."""
    try:
        from affinage.model.load import load_config
        from affinage.model.resolve import resolve_model_path

        path = resolve_model_path(recipe.model.name_or_path, revision=recipe.model.revision, mirrors=recipe.model.mirrors)
        config = load_config(recipe.model, path)
    except Exception:  # noqa: BLE001 - the size is a tuning default, not a requirement
        return None
    return getattr(config, "hidden_size", None) or getattr(getattr(config, "text_config", None), "hidden_size", None)
