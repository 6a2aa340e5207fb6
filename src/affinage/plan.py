"""`affinage plan`: what a recipe will do, computed without loading weights or tokenizing.

The model is built on the ``meta`` device from its config.json (no memory, no weights), so a 7B
plan runs in a second on a laptop that only has the config staged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from affinage.distributed.memory import MemoryEstimate, estimate_memory, human_bytes
from affinage.recipe.schema import Recipe
from affinage.model.load import count_parameters


@dataclass
class Plan:
    recipe: Recipe
    model_path: str
    model_type: str
    params_total: int
    params_trainable: int
    world_size: int
    gradient_accumulation: int
    tokens_per_step: int
    steps: int | None
    steps_note: str
    memory: MemoryEstimate
    checkpoint_bytes: int
    dtype: str
    notes: list[str] = field(default_factory=list)
    memory_by_strategy: dict[str, MemoryEstimate] = field(default_factory=dict)  # same run under each strategy
    memory_full_finetune: MemoryEstimate | None = None  # LoRA recipes: the same run as a full fine-tune
    gpu: str | None = None  # GPU kind the fit verdicts are for (affinage.distributed.memory.GPU_MEMORY_GIB)

    def as_dict(self) -> dict:
        return {
            "recipe": self.recipe.name,
            "model_path": self.model_path,
            "model_type": self.model_type,
            "params_total": self.params_total,
            "params_trainable": self.params_trainable,
            "world_size": self.world_size,
            "gradient_accumulation": self.gradient_accumulation,
            "tokens_per_step": self.tokens_per_step,
            "steps": self.steps,
            "steps_note": self.steps_note,
            "dtype": self.dtype,
            "memory_per_gpu": self.memory.as_dict(),
            "strategy": self.recipe.distributed.strategy,
            "memory_by_strategy": {k: v.as_dict() for k, v in self.memory_by_strategy.items()},
            "memory_full_finetune": self.memory_full_finetune.as_dict() if self.memory_full_finetune else None,
            "gpu": self.gpu,
            "fits": {k: v.fit(self.gpu)[0] for k, v in self.memory_by_strategy.items()} if self.gpu else None,
            "checkpoint_bytes": self.checkpoint_bytes,
            "notes": self.notes,
        }


def _meta_model(recipe: Recipe, config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    if recipe.method.kind in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = recipe.method.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.targets,
                use_dora=lora.dora,
                modules_to_save=lora.modules_to_save or None,
                task_type="CAUSAL_LM",
            ),
        )
    return model


def _linear_params(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and "lora_" not in type(m).__name__.lower())


def _count_records(recipe: Recipe) -> int | None:
    """Records after weights, by reading the sources without tokenizing (None if unreadable)."""
    try:
        from affinage.data.readers import read_source
    except ImportError:
        return None
    from affinage.data.mixture import heldout_counts

    sizes = []
    for src in recipe.data.sources:
        n = 0
        for _ in read_source(src, "skip"):
            n += 1
            if src.max_records and n >= src.max_records:
                break
        sizes.append(n)
    # the held-out split exactly as prepare draws it (heldout_fraction, capped by heldout_max)
    held = heldout_counts(sizes, recipe.data.heldout_fraction, recipe.data.heldout_max)
    return int(sum((n - h) * src.weight for n, h, src in zip(sizes, held, recipe.data.sources)))


def _layer_params(model, layers: int) -> int | None:
    """Parameters of one decoder layer (the first ModuleList as long as the model is deep)."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == layers and layers > 0:
            return sum(p.numel() for p in m[0].parameters())
    return None


def make_plan(recipe: Recipe, world_size: int = 1, count_data: bool = True, gpu: str | None = None) -> Plan:
    from transformers import AutoConfig

    from affinage.model.resolve import resolve_model_path

    from affinage.model.check import read_config

    path = resolve_model_path(recipe.model.name_or_path, revision=recipe.model.revision, mirrors=recipe.model.mirrors)
    read_config(path, recipe.model.name_or_path, recipe.model.trust_remote_code)  # weights are not needed to plan
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=recipe.model.trust_remote_code)
    model = _meta_model(recipe, config)
    total, trainable = count_parameters(model)
    if recipe.method.kind == "full":
        trainable = total
    notes: list[str] = []

    accumulation = recipe.training.gradient_accumulation(world_size)
    t = recipe.training
    tokens_per_step = t.global_batch_size * recipe.data.max_length
    d = t.duration
    if d.unit == "steps":
        steps, steps_note = int(d.value), "from the recipe"
    elif d.unit == "tokens":
        steps = math.ceil(d.value / tokens_per_step)
        steps_note = "at least (assumes full-length sequences; shorter samples mean more steps)"
    else:
        records = _count_records(recipe) if count_data else None
        if records is None:
            steps, steps_note = None, "unknown until the data is read"
        else:
            steps = max(1, math.ceil(d.value * records / t.global_batch_size))
            steps_note = f"{records} training records × {d.value:g} epochs (SFT: one sample per record; CPT: long texts split into more samples)"

    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else "bfloat16"
    if recipe.model.dtype == "auto":
        notes.append("dtype auto: bfloat16 assumed on GPU (float32 on CPU)")
    if recipe.training.keep_checkpoints < 2 and recipe.training.save_every:
        notes.append("training.keep_checkpoints 1: a corrupt newest checkpoint has no previous one to fall back to (keep 2)")
    quant = recipe.method.kind == "qlora"
    hidden = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    shape = dict(
        params_total=total,
        params_linear=_linear_params(model),
        hidden=hidden,
        intermediate=getattr(config, "intermediate_size", 4 * hidden),
        layers=layers,
        vocab=getattr(config, "vocab_size", 0),
        seq_len=recipe.data.max_length,
        micro_batch=t.micro_batch_size,
        dtype=dtype,
        optimizer=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        world_size=world_size,
        params_layer=_layer_params(model, layers),
        sequences_per_sample=2 if recipe.task == "dpo" else 1,  # chosen + rejected in one forward
        reference_copy=recipe.preference is not None and recipe.preference.resolved_reference(recipe.method.kind) == "frozen_copy",
    )
    from affinage.sharding import STRATEGIES
    from affinage.recipe.schema import DistributedSpec

    def per_strategy(trainable_params: int, quantized: bool) -> dict[str, MemoryEstimate]:
        out = {}
        for name in STRATEGIES:
            if name == "single" and world_size > 1:
                continue
            spec = recipe.distributed if name == recipe.distributed.strategy else DistributedSpec(strategy=name)
            opt, params = spec.offloads()
            out[name] = estimate_memory(**shape, params_trainable=trainable_params, quantized_4bit=quantized,
                                        strategy=name, offload_optimizer=opt, offload_params=params)
        return out

    by_strategy = per_strategy(trainable, quant)
    chosen = recipe.distributed.strategy
    if chosen == "single" and world_size > 1:
        notes.append("distributed.strategy single refuses several processes: use ddp, fsdp2 or zero*")
        chosen = "ddp"
    memory = by_strategy[chosen]
    full_ft = per_strategy(total, False)[chosen] if recipe.method.kind == "lora" else None
    if gpu is not None:
        from affinage.distributed.memory import GPU_MEMORY_GIB

        if gpu not in GPU_MEMORY_GIB:
            from affinage.errors import UserError

            raise UserError(f"unknown GPU kind {gpu!r}; known: {', '.join(GPU_MEMORY_GIB)}")
    from affinage.distributed.memory import DTYPE_BYTES

    b = DTYPE_BYTES[dtype]
    if recipe.method.kind == "full":
        checkpoint = total * b + total * 2 * b  # weights + AdamW states
    else:
        checkpoint = trainable * 4 * 3  # fp32 adapter + AdamW states
    return Plan(
        recipe=recipe,
        model_path=str(path),
        model_type=config.model_type,
        params_total=total,
        params_trainable=trainable,
        world_size=world_size,
        gradient_accumulation=accumulation,
        tokens_per_step=tokens_per_step,
        steps=steps,
        steps_note=steps_note,
        memory=memory,
        checkpoint_bytes=checkpoint,
        dtype=dtype,
        notes=notes,
        memory_by_strategy=by_strategy,
        memory_full_finetune=full_ft,
        gpu=gpu,
    )


# A global batch of tokens past this is beyond any cluster's step (Llama 3 pre-training used 16M).
MAX_TOKENS_PER_STEP = 1 << 28


def check_fits(plan: Plan) -> None:
    """Refuse, with the reason and what would work, a run the plan can already see will not fit."""
    from affinage.distributed.memory import GPU_MEMORY_GIB
    from affinage.errors import UserError

    r = plan.recipe
    if plan.tokens_per_step > MAX_TOKENS_PER_STEP:
        raise UserError(f"{plan.tokens_per_step:,} tokens per optimizer step (training.global_batch_size "
                        f"{r.training.global_batch_size} × data.max_length {r.data.max_length}) is beyond any run "
                        f"(at most {MAX_TOKENS_PER_STEP:,}; fine-tunes use 0.1M–4M): lower one of them")
    chosen = r.distributed.strategy if r.distributed.strategy in plan.memory_by_strategy else "ddp"
    kinds = [plan.gpu] if plan.gpu else [max(GPU_MEMORY_GIB, key=GPU_MEMORY_GIB.get)]
    for kind in kinds:
        verdict, share = plan.memory.fit(kind)
        if verdict != "does not fit":
            continue
        fitting = [n for n, m in plan.memory_by_strategy.items() if m.fit(kind)[0] != "does not fit"]
        where = f"a {kind} GPU ({GPU_MEMORY_GIB[kind]} GiB)" if plan.gpu else f"any GPU affinage knows (largest: {kind}, {GPU_MEMORY_GIB[kind]} GiB)"
        fix = (f"strategies that fit on {plan.world_size} process(es): {', '.join(fitting)} (distributed.strategy)" if fitting
               else "lower data.max_length or micro_batch_size, turn on training.gradient_checkpointing, use LoRA/QLoRA or more GPUs (--world-size)")
        raise UserError(f"the run needs ≈ {human_bytes(plan.memory.total)} per GPU with {chosen} ({100 * share:.0f}% of {where}): "
                        f"it will not fit; {fix}")


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_plan(plan: Plan) -> str:
    r = plan.recipe
    m = plan.memory
    lines = [
        f"recipe          {r.name} ({r.task}, {r.method.kind})",
        f"model           {r.model.name_or_path} → {plan.model_path} [{plan.model_type}, {plan.dtype}]",
        f"parameters      {_count(plan.params_total)} total, {_count(plan.params_trainable)} trainable "
        f"({100 * plan.params_trainable / max(1, plan.params_total):.2f}%)",
        f"world size      {plan.world_size} process(es) × micro batch {r.training.micro_batch_size} × "
        f"accumulation {plan.gradient_accumulation} = global batch {r.training.global_batch_size}",
        f"tokens/step     ≤ {plan.tokens_per_step:,} (global batch × max_length {r.data.max_length})",
        f"duration        {r.training.duration} → "
        + (f"{plan.steps:,} optimizer steps ({plan.steps_note})" if plan.steps else plan.steps_note),
        f"peak memory     ≈ {human_bytes(m.total)} per GPU with {r.distributed.strategy} (weights {human_bytes(m.weights)}, grads "
        f"{human_bytes(m.gradients)}, optimizer {human_bytes(m.optimizer)}, activations "
        f"{human_bytes(m.activations)}, logits {human_bytes(m.logits)}"
        + (f", frozen reference model {human_bytes(m.reference)}" if m.reference else "") + ")"
        + (f"; {human_bytes(m.cpu_offloaded)} offloaded to CPU RAM per process" if m.cpu_offloaded else ""),
        *([f"reference       {r.preference.resolved_reference(r.method.kind)} (dpo/kto: chosen and rejected share each "
           f"micro-batch, counted in activations)"] if r.preference is not None else []),
        f"activations     {human_bytes(m.activations_full)} without, {human_bytes(m.activations_checkpointed)} with "
        f"gradient checkpointing (now {'on' if r.training.gradient_checkpointing else 'off'}), per micro-batch of "
        f"{r.training.micro_batch_size} × {r.data.max_length} tokens",
        *_strategy_table(plan),
        f"checkpoint      ≈ {human_bytes(plan.checkpoint_bytes)} each, {r.training.keep_checkpoints} kept",
        f"run directory   {r.run_dir()}",
    ]
    lines += [f"note            {n}" for n in plan.notes]
    return "\n".join(lines)


def _strategy_table(plan: Plan) -> list[str]:
    """One row per strategy on this world size: memory per GPU by component, CPU offload, fit on ``plan.gpu``."""
    if not plan.memory_by_strategy:
        return []
    head = f"{'strategy':<15} {'weights':>10} {'grads':>10} {'optimizer':>10} {'act+logits':>11} {'total/GPU':>10} {'CPU RAM':>9}"
    if plan.gpu:
        head += f"  fit on {plan.gpu}"
    lines = [f"per strategy    {plan.world_size} process(es); estimates, see affinage.distributed.memory", "  " + head]
    chosen = plan.recipe.distributed.strategy
    for name, m in plan.memory_by_strategy.items():
        row = (f"{name + (' *' if name == chosen else ''):<15} {human_bytes(m.weights):>10} {human_bytes(m.gradients):>10} "
               f"{human_bytes(m.optimizer):>10} {human_bytes(m.activations + m.logits):>11} {human_bytes(m.total):>10} "
               f"{human_bytes(m.cpu_offloaded) if m.cpu_offloaded else '-':>9}")
        if plan.gpu:
            verdict, share = m.fit(plan.gpu)
            row += f"  {verdict} ({100 * share:.0f}%)"
        lines.append("  " + row)
    if plan.memory_full_finetune is not None:
        f = plan.memory_full_finetune
        lines.append(f"  (a full fine-tune of this model under {f.strategy}: ≈ {human_bytes(f.total)} per GPU)")
    return lines
