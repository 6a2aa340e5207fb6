"""Attention that never crosses samples in a padding-free batch.

``use_varlen_attention`` switches an SDPA model to ``affinage_varlen``: causal SDPA run separately on
each segment of a padding-free batch (``cu_seq_lens_q`` from ``data.collator.PackedCollator``), i.e.
flash-attention's varlen semantics on any device, with the cost of the segments (Σ n²) instead of a
dense block-diagonal mask over the whole batch ((Σ n)²). Flash-attention models are left alone: they
read the same ``cu_seq_lens`` natively.
"""

from __future__ import annotations

from typing import Optional

import torch

VARLEN = "affinage_varlen"


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
