"""`affinage plan`: what a recipe will do, computed without loading weights or tokenizing.

The model is built on the ``meta`` device from its config.json (no memory, no weights), so a 7B
plan runs in a second on a laptop that only has the config staged.

One cohesive thing (over 400 lines): the plan of a recipe and its printed form.
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
    flops_per_token: float = 0.0  # training FLOPs per token (``training_flops_per_token``)
    kernels: str = ""  # what training.kernels resolves to (``affinage.train.kernels.plan_line``)

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
            "flops_per_token": self.flops_per_token,
            "kernels": self.kernels,
            "throughput": throughput(self.flops_per_token, self.gpu, self.world_size) if self.gpu else None,
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


# Dense bf16 peak per GPU (vendor datasheets, SXM parts; no sparsity), for MFU and plan's throughput estimate.
PEAK_BF16_FLOPS = {"h200": 989e12, "h100": 989e12, "a100-80": 312e12, "a100-40": 312e12, "v100-32": 125e12,
                   "v100-16": 125e12, "mi250x": 191.5e12, "l40s": 362e12, "a10": 125e12, "rtx4090": 165e12}
ASSUMED_MFU = 0.40  # plan's tokens/s assumes this share of peak: typical of a tuned dense fine-tune; bench/gpu.py measures it


def training_flops_per_token(*, linear_params: int, layers: int, hidden: int, seq_len: int, lora: bool) -> float:
    """Forward + backward FLOPs per trained token: 2N forward, 2N activation gradients, 2N weight gradients
    (skipped by LoRA's frozen base), plus causal attention scores (6·layers·hidden·seq_len)."""
    return (4 if lora else 6) * linear_params + 6 * layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, gpu: str, world_size: int = 1) -> float:
    """Model FLOPs utilisation: achieved training FLOPs over the GPUs' dense bf16 peak."""
    return tokens_per_s * flops_per_token / (PEAK_BF16_FLOPS[gpu] * world_size)


def throughput(flops_per_token: float, gpu: str | None, world_size: int = 1, assumed_mfu: float = ASSUMED_MFU) -> dict | None:
    if not gpu or gpu not in PEAK_BF16_FLOPS or not flops_per_token:
        return None
    peak = PEAK_BF16_FLOPS[gpu] * world_size
    return {"peak_flops": peak, "assumed_mfu": assumed_mfu, "tokens_per_s": assumed_mfu * peak / flops_per_token,
            "tokens_per_s_at_peak": peak / flops_per_token}


def _packed_rows(recipe: Recipe, records: int) -> tuple[int, str]:
    """Training rows (what the Trainer steps over): from the prepared cache when it exists, else estimated."""
    from affinage.errors import UserError
    from affinage.data.cache import cache_root, key_of
    from affinage.data.cache_key import cache_key_inputs
    from affinage.hashing import FileHasher

    try:
        root = cache_root(recipe.data)
        folder = root / key_of(cache_key_inputs(recipe, None, FileHasher(None)))
        if (folder / "meta.json").is_file():
            from affinage.data.cache import PreparedCache

            return len(PreparedCache.open(folder).train), f"packed rows of the prepared cache {folder.name[:12]}"
    except (UserError, OSError, ValueError):  # no tokenizer folder, unreadable cache: estimate below
        pass
    if recipe.data.packing == "none" and recipe.task == "sft":
        return records, "one sample per row (packing none)"
    tokens = _sample_tokens_per_record(recipe)
    if tokens is None:
        return records, "records, not packed rows (tokenizer not found: run affinage prepare for the exact count)"
    fill = 0.9  # measured row fill of BFD on the shared corpora: 83-96 %
    rows = max(1, math.ceil(records * min(tokens, recipe.data.max_length * 8) / (recipe.data.max_length * fill)))
    return min(rows, records) if recipe.task == "sft" else rows, (
        f"≈ packed rows: {tokens:.0f} tokens/record on the first records × {records} records / "
        f"({recipe.data.max_length} × {fill:.0%} fill); affinage prepare gives the exact count")


def _sample_tokens_per_record(recipe: Recipe, n: int = 64) -> float | None:
    """Mean tokens of the first ``n`` records' text (all string values), with the recipe's tokenizer."""
    from affinage.errors import UserError

    try:
        from affinage.data.readers import read_source
        from affinage.model.load import load_tokenizer

        tok = load_tokenizer(recipe.model)
        texts = []
        for src in recipe.data.sources:
            for i, rec in enumerate(read_source(src, "skip")):
                if i >= n:
                    break
                texts.append(" ".join(_strings(getattr(rec, "data", rec))))
        if not texts:
            return None
        return sum(len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]) / len(texts)
    except (UserError, OSError, ValueError):  # no tokenizer or unreadable source: plan says so
        return None


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


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
            rows, how = _packed_rows(recipe, records)
            steps = max(1, math.ceil(d.value * rows / t.global_batch_size))
            steps_note = f"{rows} training rows × {d.value:g} epochs / global batch ({how}; {records} records)"

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
        loss_chunk_tokens=t.loss.chunk_tokens if t.loss.kind == "chunked" else None,
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
    flops = training_flops_per_token(linear_params=shape["params_linear"], layers=layers, hidden=hidden,
                                     seq_len=recipe.data.max_length, lora=recipe.method.kind in ("lora", "qlora"))
    import torch

    from affinage.train.kernels import plan_line

    kernels = plan_line(recipe.training.kernels, config.model_type, on_cuda=gpu is not None or torch.cuda.is_available())
    return Plan(
        kernels=kernels,
        flops_per_token=flops,
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
        *([_start_line(r)] if r.preference is not None and r.preference.from_run else []),
        f"activations     {human_bytes(m.activations_full)} without, {human_bytes(m.activations_checkpointed)} with "
        f"gradient checkpointing (now {'on' if r.training.gradient_checkpointing else 'off'}), per micro-batch of "
        f"{r.training.micro_batch_size} × {r.data.max_length} tokens",
        *_strategy_table(plan),
        f"checkpoint      ≈ {human_bytes(plan.checkpoint_bytes)} each, {r.training.keep_checkpoints} kept",
        *_throughput_lines(plan),
        *([f"kernels         {plan.kernels}"] if plan.kernels else []),
        f"run directory   {r.run_dir()}",
    ]
    lines += [f"note            {n}" for n in plan.notes]
    return "\n".join(lines)


def _start_line(r: Recipe) -> str:
    """Where a DPO/KTO recipe starts: its SFT run, trained or still to train (then how to chain them)."""
    from affinage.paths import expand

    p = r.preference
    final = expand(p.from_run) / "final"
    state = "trained" if final.is_dir() else (
        f"{final} not trained yet: train the SFT recipe first, or on SLURM chain both: affinage submit RECIPE "
        f"--pipeline prepare,sft,{r.task},eval --from-recipe SFT_RECIPE"
    )
    return f"starts from     SFT run {p.from_run} (start: {p.start}; {state})"


def _throughput_lines(plan: Plan) -> list[str]:
    tp = throughput(plan.flops_per_token, plan.gpu, plan.world_size)
    line = f"compute         {plan.flops_per_token / 1e9:.2f} GFLOPs per trained token (forward + backward)"
    if tp is None:
        return [line + ("" if plan.gpu else "; pass --gpu KIND for a tokens/s estimate")]
    return [line, f"throughput      ≈ {tp['tokens_per_s']:,.0f} tokens/s on {plan.world_size} × {plan.gpu} at an assumed "
                  f"MFU of {tp['assumed_mfu']:.0%} (≤ {tp['tokens_per_s_at_peak']:,.0f} at peak)"]


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
