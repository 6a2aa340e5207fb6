"""Loss only where it counts, and attention that never crosses samples.

``AffinageTrainer`` is the HF ``Trainer`` with one change, ``compute_loss``: the language-model head
(hidden → vocabulary, the largest matmul of a small model with a 65k vocabulary) and the
cross-entropy run only at positions whose next token carries a label. For SFT on short answers
(PIAF: ~3.5 % of tokens) this skips ~96 % of the head. It goes through the model's own forward
with ``logits_to_keep`` (a tensor of positions), so PEFT adapters, DDP/FSDP/DeepSpeed wrappers and
gradient checkpointing see an ordinary forward. The loss is the sum of token losses divided by
``num_items_in_batch`` (the Trainer's count of ``labels[..., 1:] != -100`` over all gradient-
accumulation micro-batches, and over processes with ``average_tokens_across_devices``), i.e. the
same normalisation as the model's own loss in transformers 5; tested equal to the model's loss.

``use_varlen_attention`` switches an SDPA model to ``affinage_varlen``: causal SDPA run separately on
each segment of a padding-free batch (``cu_seq_lens_q`` from ``data.collator.PackedCollator``), i.e.
flash-attention's varlen semantics on any device, with the cost of the segments (Σ n²) instead of a
dense block-diagonal mask over the whole batch ((Σ n)²). Flash-attention models are left alone: they
read the same ``cu_seq_lens`` natively.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import Trainer

from affinage.data.collator import IGNORE_INDEX

VARLEN = "affinage_varlen"


# ------------------------------------------------------------------------------------ attention
def _varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        # not a padding-free batch (or decoding with a cache): the ordinary path
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    bounds = cu.tolist()
    if len(bounds) == 2:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            o, _ = sdpa_attention_forward(
                module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout, scaling=scaling, is_causal=True
            )
            outs.append(o)
    return torch.cat(outs, dim=1), None


def register_varlen_attention() -> None:
    from transformers import AttentionInterface

    if VARLEN not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN, _varlen_sdpa)


def base_model(model):
    """The transformers model under DDP/accelerate and PEFT wrappers."""
    m = model
    while hasattr(m, "module") and isinstance(getattr(m, "module"), torch.nn.Module):
        m = m.module
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def varlen_supported(config, max_length: Optional[int] = None) -> bool:
    """Whether per-segment causal SDPA computes exactly what this architecture's SDPA path does."""
    if getattr(config, "attn_logit_softcapping", None):
        return False
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and (max_length is None or window < max_length):
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    return True


def use_varlen_attention(model, max_length: Optional[int] = None) -> str:
    """Use ``affinage_varlen`` when the model runs SDPA and the architecture allows it; return the implementation in use."""
    base = base_model(model)
    config = base.config
    impl = getattr(config, "_attn_implementation", None)
    if impl == "sdpa" and varlen_supported(config, max_length):
        register_varlen_attention()
        base.set_attn_implementation(VARLEN)
        return VARLEN
    return impl


# ------------------------------------------------------------------------------------------ loss
def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def selective_lm_loss(model, inputs: dict, num_items_in_batch=None, *, selective: bool = True):
    """(sum of token losses / normaliser, outputs): the head is applied only where the shifted label is kept."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    inputs.pop("num_items_in_batch", None)
    shift = labels[..., 1:]
    valid = shift != IGNORE_INDEX
    if selective and _accepts_logits_to_keep(model):
        keep = valid.any(dim=0).nonzero().squeeze(-1)  # positions t whose token t+1 is a target (in any row)
        outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        targets = shift[:, keep]
    else:
        outputs = model(**inputs, use_cache=False)
        targets = shift
        outputs_logits = outputs.logits[:, :-1]
        outputs.logits = outputs_logits
    logits = outputs.logits
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    denom = num_items_in_batch if num_items_in_batch is not None else valid.sum()
    if torch.is_tensor(denom):
        denom = denom.to(loss.device).clamp(min=1)
    else:
        denom = max(int(denom), 1)
    return loss / denom, outputs


class AffinageTrainer(Trainer):
    """HF Trainer whose loss applies the LM head only at loss-bearing positions (see the module doc)."""

    def __init__(self, *args, selective_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.selective_loss = selective_loss
        # our compute_loss normalises by num_items_in_batch: make the Trainer count it and not divide again
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        if "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = selective_lm_loss(model, inputs, num_items_in_batch, selective=self.selective_loss)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if return_outputs:
            return loss, {"loss": loss}
        return loss
