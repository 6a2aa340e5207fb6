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

``training.loss.kind: chunked`` (CPT, where every token is a target and the selective head saves
nothing) never materialises the (tokens × vocabulary) logits: the head's own forward is replaced, for
one call, by a linear + cross-entropy over chunks of ``chunk_tokens`` tokens, each chunk under
activation checkpointing (its logits are recomputed in the backward pass instead of kept). Running
inside the head's forward keeps FSDP2/ZeRO-3 gathering the head's weight as for a plain call. On CUDA,
``backend: auto`` uses Cut Cross-Entropy (``cut_cross_entropy``), else Liger's fused linear
cross-entropy, when installed: the same sum of token losses from fused kernels. Tested equal (loss
and gradients) to the plain path on CPU, with a lower measured peak memory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import Trainer

from affinage.data.collator import IGNORE_INDEX
from affinage.errors import UserError
from affinage.train.attention import base_model

# config attributes that transform logits after the head: the chunked path would skip them
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


class LossConfigError(UserError):
    """training.loss asks for something this model or machine cannot do."""


# ------------------------------------------------------------------------------------------ loss
def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_backend(backend: str, on_cuda: bool) -> str:
    """The chunked-loss implementation for ``training.loss.backend`` on this machine ("torch", "cce" or "liger")."""
    if backend == "auto":
        if on_cuda and _has("cut_cross_entropy"):
            return "cce"
        if on_cuda and _has("liger_kernel"):
            return "liger"
        return "torch"
    if backend in ("cce", "liger"):
        module = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}[backend]
        if not on_cuda:
            raise LossConfigError(f"training.loss.backend {backend} runs on CUDA only: use backend auto or torch on this machine")
        if not _has(module):
            raise LossConfigError(f"training.loss.backend {backend} needs the {module} package: pip install it, or use backend auto")
    return backend


def check_chunked_supported(model) -> None:
    """Raise when the head is not a plain linear layer or the logits are transformed after it."""
    base = base_model(model)
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise LossConfigError(
            f"training.loss.kind chunked needs a plain linear LM head; this model's is {type(head).__name__} "
            "(an adapter or wrapper on lm_head?): remove lm_head from the LoRA targets/modules_to_save or use kind plain"
        )
    text = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    used = [a for a in _LOGIT_TRANSFORMS if getattr(text, a, None) not in (None, 1, 1.0)]
    if used:
        raise LossConfigError(f"training.loss.kind chunked does not apply this architecture's logit transform ({', '.join(used)}): use kind plain")


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def linear_cross_entropy(hidden, weight, bias, targets, *, chunk_tokens: int = 4096, backend: str = "torch") -> torch.Tensor:
    """Σ cross-entropy(hidden @ weightᵀ + bias, targets) over targets != -100, without the whole logits.

    ``hidden`` (..., d), ``targets`` (...). torch: chunks of ``chunk_tokens`` loss-bearing tokens, each
    checkpointed, so one chunk's logits exist at a time in forward and backward.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    keep = targets != IGNORE_INDEX
    h, t = hidden[keep], targets[keep]
    if backend == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        return cce(h, weight, t, bias=bias, reduction="sum").float()
    if backend == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, h, t, bias).float()
    total = hidden.new_zeros((), dtype=torch.float32) + 0 * hidden.sum()  # connected even when no token counts
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    for a in range(0, h.shape[0], chunk_tokens):
        args = (h[a : a + chunk_tokens], weight, bias, t[a : a + chunk_tokens])
        total = total + (torch.utils.checkpoint.checkpoint(_chunk_ce, *args, use_reentrant=False) if grad else _chunk_ce(*args))
    return total


@contextlib.contextmanager
def _head_computes_loss(model, targets: torch.Tensor, chunk_tokens: int, backend: str):
    """For one forward, the LM head returns Σ token losses (a scalar) instead of logits."""
    head = base_model(model).get_output_embeddings()

    def forward(hidden):
        return linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk_tokens=chunk_tokens, backend=backend)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def selective_lm_loss(model, inputs: dict, num_items_in_batch=None, *, selective: bool = True, chunked: Optional[dict] = None):
    """(sum of token losses / normaliser, outputs): the head is applied only where the shifted label is kept.

    ``chunked`` ({"chunk_tokens": n, "backend": b}): head and cross-entropy by chunks (module doc);
    ``outputs.logits`` is then None.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    inputs.pop("num_items_in_batch", None)
    shift = labels[..., 1:]
    valid = shift != IGNORE_INDEX
    if chunked is not None:
        if selective and _accepts_logits_to_keep(model):
            keep = valid.any(dim=0).nonzero().squeeze(-1)
            kw, targets = {"logits_to_keep": keep}, shift[:, keep]
        else:  # the head sees every position: the last one has no next token
            kw, targets = {}, F.pad(shift, (0, 1), value=IGNORE_INDEX)
        with _head_computes_loss(model, targets, chunked["chunk_tokens"], chunked["backend"]):
            outputs = model(**inputs, use_cache=False, **kw)
        loss, outputs.logits = outputs.logits, None
        return loss / _denominator(num_items_in_batch, valid, loss.device), outputs
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
    return loss / _denominator(num_items_in_batch, valid, loss.device), outputs


def _denominator(num_items_in_batch, valid, device):
    denom = num_items_in_batch if num_items_in_batch is not None else valid.sum()
    if torch.is_tensor(denom):
        return denom.to(device).clamp(min=1)
    return max(int(denom), 1)


class AffinageTrainer(Trainer):
    """HF Trainer whose loss applies the LM head only at loss-bearing positions (see the module doc)."""

    def __init__(self, *args, selective_loss: bool = True, loss_spec=None, **kwargs):
        """``loss_spec``: the recipe's ``training.loss`` (``recipe.schema.LossSpec``); None: plain."""
        super().__init__(*args, **kwargs)
        self.selective_loss = selective_loss
        self.chunked = None
        if loss_spec is not None and loss_spec.kind == "chunked":
            check_chunked_supported(self.model)
            self.chunked = {"chunk_tokens": loss_spec.chunk_tokens,
                            "backend": resolve_backend(loss_spec.backend, self.args.device.type == "cuda")}
        # our compute_loss normalises by num_items_in_batch: make the Trainer count it and not divide again
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        if "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = selective_lm_loss(model, inputs, num_items_in_batch, selective=self.selective_loss, chunked=self.chunked)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if return_outputs:
            return loss, {"loss": loss}
        return loss
