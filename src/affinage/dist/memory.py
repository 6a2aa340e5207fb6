"""Peak memory estimate per GPU, before anything is loaded.

A first-order model, stated so it can be checked against measured peaks (``affinage plan`` prints
both the total and its parts):

- weights: every parameter in the load dtype (QLoRA: Linear weights at 4 bits + a small
  quantisation state, the rest in the compute dtype);
- gradients: trainable parameters in the training dtype;
- optimizer: AdamW keeps two states per trainable parameter (same dtype as the parameter; 1 byte
  each for 8-bit optimizers), SGD none;
- activations: per layer and token, ``10·h + 5·i`` values kept for backward (attention projections,
  norms, gated MLP with intermediate size ``i``; flash/sdpa kernels keep no L×L score matrix); with
  gradient checkpointing only each layer's input (``h``) plus one layer recomputed;
- logits: ``micro_batch × seq × vocab`` in fp32, twice (softmax and its gradient): with 65k–150k
  vocabularies this is often the largest single term on small models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


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
) -> MemoryEstimate:
    b = DTYPE_BYTES[dtype]
    if quantized_4bit:
        weights = int(params_linear * 0.5 * 1.03) + (params_total - params_linear) * b
    else:
        weights = params_total * b
    trainable_bytes = 4 if quantized_4bit else b  # LoRA adapters on a 4-bit base train in fp32
    gradients = params_trainable * trainable_bytes
    if optimizer == "sgd":
        optimizer_bytes = 0
    elif "8bit" in optimizer:
        optimizer_bytes = params_trainable * 2
    else:
        optimizer_bytes = params_trainable * 2 * trainable_bytes
    tokens = micro_batch * seq_len
    if gradient_checkpointing:
        activations = tokens * hidden * b * layers + tokens * (10 * hidden + 5 * intermediate) * b
    else:
        activations = tokens * (10 * hidden + 5 * intermediate) * b * layers
    logits = tokens * vocab * 4 * 2
    return MemoryEstimate(weights, gradients, optimizer_bytes, activations, logits)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
