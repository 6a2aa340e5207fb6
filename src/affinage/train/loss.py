"""Loss only where it counts.

``AffinageTrainer`` is the HF ``Trainer`` with one change, ``compute_loss``: the language-model head
(hidden → vocabulary, the largest matmul of a small model with a 65k vocabulary) and the
cross-entropy run only at positions whose next token carries a label. For SFT on short answers
(PIAF: ~3.5 % of tokens) this skips ~96 % of the head. It goes through the model's own forward
with ``logits_to_keep`` (a tensor of positions), so PEFT adapters, DDP/FSDP/DeepSpeed wrappers and
gradient checkpointing see an ordinary forward. The loss is the sum of token losses divided by
``num_items_in_batch`` (the Trainer's count of ``labels[..., 1:] != -100`` over all gradient-
accumulation micro-batches, and over processes with ``average_tokens_across_devices``), i.e. the
same normalisation as the model's own loss in transformers 5; tested equal to the model's loss.
(The attention kernel for padding-free batches lives in ``train.attention``.)
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from affinage.data.templates import IGNORE_INDEX
from affinage.train.attention import base_model


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
