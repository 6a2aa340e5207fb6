"""Peak memory estimate per GPU, per sharding strategy, before anything is loaded.

A first-order model, stated so it can be checked against measured peaks (``affinage plan`` prints
both the total and its parts). ``P`` parameters (``T`` trainable), ``b`` bytes per value of the
load dtype, ``N`` processes (data-parallel world size):

- weights: every parameter in the load dtype (QLoRA: Linear weights at 4 bits + a small
  quantisation state, the rest in the compute dtype). Replicated under single/ddp/zero2; ``P·b/N``
  under fsdp2/zero3, plus the *working set*: parameters gathered while a layer runs (the root unit
  — embeddings, final norm, LM head — and two decoder layers: the one computing and the one
  prefetched). With parameter offload the shards live in CPU RAM and only the working set is on
  the GPU.
- gradients: trainable parameters in the training dtype; ``/N`` when sharded (zero2, zero3,
  fsdp2). With optimizer offload (DeepSpeed) they are moved to CPU RAM as fp32 partitions.
- optimizer: AdamW keeps two states per trainable parameter (same dtype as the parameter; 1 byte
  each for 8-bit optimizers), SGD none; ``/N`` under fsdp2. DeepSpeed keeps an fp32 master copy of
  its partition plus fp32 states: ``12·T/N`` bytes for AdamW whatever the model dtype (measured on
  CPU: exact). Offloaded: 0 on the GPU, the same bytes in CPU RAM.
- activations: per layer and token, ``10·h + 5·i`` values kept for backward (attention projections,
  norms, gated MLP with intermediate size ``i``; flash/sdpa kernels keep no L×L score matrix); with
  gradient checkpointing only each layer's input (``h``) plus one layer recomputed. They do not
  depend on the strategy (each GPU runs its own micro-batch).
- logits: ``micro_batch × seq × vocab`` in fp32, twice (softmax and its gradient): with 65k–150k
  vocabularies this is often the largest single term on small models. With ``training.loss.kind:
  chunked`` only one chunk of ``chunk_tokens`` rows is held at a time (recomputed in backward):
  ``min(tokens, chunk) × vocab × 4 × 2`` (measured on CPU by torch's profiler, 4×1024 tokens and a
  16k vocabulary: 1,053 MiB plain, 131 MiB chunked by 512; tests/train/test_train_loss.py).

Not modelled: the CUDA context (~0.5–1 GiB), allocator fragmentation, communication buffers
(ZeRO buckets, NCCL), temporary copies while saving. ``fits`` keeps a margin for them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional
from affinage.sharding import STRATEGIES
from affinage.sharding import strategy as strategy_entry

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Usable memory of the GPU kinds found on French and European clusters (GiB, as reported by the driver).
GPU_MEMORY_GIB = {
    "h200": 141,
    "h100": 80,
    "a100-80": 80,
    "a100-40": 40,
    "v100-32": 32,
    "v100-16": 16,
    "mi250x": 64,  # one GCD, as LUMI-G exposes it
    "l40s": 48,
    "a10": 24,
    "rtx4090": 24,
}

# Dense bf16 tensor peak per GPU in TFLOP/s (vendor data sheets; V100: fp16, it has no bf16; SXM parts),
# for `affinage plan --cluster` when no step time was measured.
GPU_PEAK_TFLOPS = {
    "h200": 989,
    "h100": 989,
    "a100-80": 312,
    "a100-40": 312,
    "v100-32": 125,
    "v100-16": 125,
    "mi250x": 191,  # one GCD
    "l40s": 362,
    "a10": 125,
    "rtx4090": 165,
}

CONTEXT_GIB = 1.0  # CUDA/ROCm context and libraries
MARGIN = 0.10  # fragmentation and buffers not modelled


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    strategy: str = "ddp"
    world_size: int = 1
    working_set: int = 0  # part of ``weights``: parameters gathered while layers run (fsdp2/zero3)
    cpu_weights: int = 0  # bytes per process in CPU RAM (offload), by component
    cpu_gradients: int = 0
    cpu_optimizer: int = 0
    activations_checkpointed: int = 0  # the activation term with gradient checkpointing
    activations_full: int = 0  # ... and without
    reference: int = 0  # preference training with reference: frozen_copy: the second, frozen model's weights


    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.reference

    @property
    def cpu_offloaded(self) -> int:
        return self.cpu_weights + self.cpu_gradients + self.cpu_optimizer

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "cpu_offloaded": self.cpu_offloaded}

    def fit(self, gpu: str) -> tuple[str, float]:
        """(verdict, fraction of the GPU's usable memory): ``fits``, ``tight`` (within the margin) or ``does not fit``."""
        capacity = (GPU_MEMORY_GIB[gpu] - CONTEXT_GIB) * 2**30
        share = self.total / capacity
        if share <= 1 - MARGIN:
            return "fits", share
        if share <= 1:
            return "tight", share
        return "does not fit", share


def estimate_memory(
    *,
    params_total: int,
    params_trainable: int,
    params_linear: int,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    seq_len: int,
    micro_batch: int,
    dtype: str,
    quantized_4bit: bool,
    optimizer: str,
    gradient_checkpointing: bool,
    strategy: str = "ddp",
    world_size: int = 1,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    params_layer: Optional[int] = None,
    sequences_per_sample: int = 1,
    reference_copy: bool = False,
    loss_chunk_tokens: Optional[int] = None,
) -> MemoryEstimate:
    """Bytes per GPU for one process of ``world_size`` running ``strategy`` (see the module doc).

    ``params_layer``: parameters of one decoder layer (default: the non-embedding parameters / layers).
    Preference training: ``sequences_per_sample`` = 2 (DPO runs chosen and rejected in one batch),
    ``reference_copy``: a frozen second model (sharded like the policy's weights, no gradients or states).
    ``loss_chunk_tokens``: the chunked head's rows per chunk (``training.loss``), None for the plain head.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    n = max(1, world_size)
    b = DTYPE_BYTES[dtype]
    if quantized_4bit:
        weights_full = int(params_linear * 0.5 * 1.03) + (params_total - params_linear) * b
    else:
        weights_full = params_total * b
    trainable_bytes = 4 if quantized_4bit else b  # LoRA adapters on a 4-bit base train in fp32

    table = strategy_entry(strategy)
    sharded_params, deepspeed = table.shards_params, table.deepspeed
    if table.offload_by_default and not (offload_optimizer or offload_params):
        offload_optimizer = offload_params = True

    # weights
    cpu_w = cpu_g = cpu_o = working = 0
    if sharded_params:
        layer = params_layer if params_layer is not None else max(0, params_total - 2 * vocab * hidden) // max(1, layers)
        root = max(0, params_total - layers * layer)
        working = int((root + 2 * layer) * (weights_full / max(1, params_total)))
        shard = weights_full // n
        if quantized_4bit and strategy == "fsdp2":
            # accelerate keeps bitsandbytes' uint8 4-bit storage out of fully_shard: replicated
            packed = int(params_linear * 0.5 * 1.03)
            shard = packed + (weights_full - packed) // n
        if offload_params:
            weights, cpu_w = working, shard
        else:
            weights = shard + working
    else:
        weights = weights_full

    # gradients
    grads_full = params_trainable * trainable_bytes
    if deepspeed and offload_optimizer:
        gradients, cpu_g = 0, params_trainable * 4 // n
    elif strategy == "fsdp2" and offload_params:
        gradients, cpu_g = 0, grads_full // n
    elif table.shards_states:
        gradients = grads_full // n
    else:
        gradients = grads_full

    # optimizer states (+ DeepSpeed's fp32 master partition)
    if optimizer == "sgd":
        per_param = 0
    elif "8bit" in optimizer:
        per_param = 2
    else:
        per_param = 2 * (4 if deepspeed else trainable_bytes)
    if deepspeed:
        per_param += 4  # fp32 master copy of the partition
    states = params_trainable * per_param
    if not table.shards_states:
        optimizer_bytes = states
    elif (deepspeed and offload_optimizer) or (strategy == "fsdp2" and offload_params):
        optimizer_bytes, cpu_o = 0, states // n
    else:
        optimizer_bytes = states // n

    tokens = micro_batch * seq_len * sequences_per_sample
    act_ckpt = tokens * hidden * b * layers + tokens * (10 * hidden + 5 * intermediate) * b
    act_full = tokens * (10 * hidden + 5 * intermediate) * b * layers
    activations = act_ckpt if gradient_checkpointing else act_full
    logits = min(tokens, loss_chunk_tokens or tokens) * vocab * 4 * 2
    reference = weights if reference_copy else 0  # laid out like the policy's weights on the GPU
    return MemoryEstimate(
        weights, gradients, optimizer_bytes, activations, logits,
        strategy=strategy, world_size=n, working_set=working, cpu_weights=cpu_w, cpu_gradients=cpu_g, cpu_optimizer=cpu_o,
        activations_checkpointed=act_ckpt, activations_full=act_full, reference=reference,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
