"""Attention that never crosses samples in a padding-free batch.

``use_varlen_attention`` switches an SDPA model to ``affinage_varlen``: causal SDPA run separately on
each segment of a padding-free batch (``cu_seq_lens_q`` from ``data.collator.PackedCollator``), i.e.
flash-attention's varlen semantics on any device, with the cost of the segments (Σ n²) instead of a
dense block-diagonal mask over the whole batch ((Σ n)²). Flash-attention models are left alone: they
read the same ``cu_seq_lens`` natively.

Short segments are attended in groups: segments of at most ``GROUP_MAX_TOKENS`` tokens, sorted by
length, are right-padded to their group's longest and run as one batched causal SDPA call. That is
exact: padding sits after every real token, so a causal query never sees it, and padded outputs are
dropped. It trades padded work (a group costs at most ``GROUP_SLACK`` × its Σ n²) for fewer calls,
which pays only where the call count, not the arithmetic, is the cost: many short samples in a row
(``bench/bench_attention.py``: on CPU 32 segments of 64 tokens 1.7× faster, mixed 20..400-token
segments even). Longer segments keep one call each. (FlexAttention would take a document mask in one
call, but torch 2.13 has no FlexAttention backward on CPU; on GPU flash-attention varlen does this.)
"""

from __future__ import annotations

from typing import Optional

import torch

VARLEN = "affinage_varlen"


GROUP_MAX_TOKENS = 128  # segments this short are attended in padded groups (measured: module doc)
GROUP_SLACK = 1.5  # a group's padded Σ L² stays within this factor of its real Σ n²


def length_groups(lengths: list[int], short: int = GROUP_MAX_TOKENS, slack: float = GROUP_SLACK) -> list[list[int]]:
    """Indices of ``lengths`` in attention calls: each long segment alone, short ones grouped by length.

    Short segments are taken longest first; a group closes when padding every member to its first
    (longest) length would cost more than ``slack`` × the members' Σ n².
    """
    calls = [[i] for i, n in enumerate(lengths) if n > short]
    group, width, cost = [], 0, 0
    for i in sorted((i for i, n in enumerate(lengths) if n <= short), key=lambda i: -lengths[i]):
        n = lengths[i]
        if group and (len(group) + 1) * width * width > slack * (cost + n * n):
            calls.append(group)
            group = []
        if not group:
            width, cost = n, 0
        group.append(i)
        cost += n * n
    if group:
        calls.append(group)
    return calls


def _varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        # not a padding-free batch (or decoding with a cache): the ordinary path
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    bounds = cu.tolist()
    if len(bounds) == 2:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)
    starts = [a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    outs, where = [], []  # per call: (tokens, heads, dim) outputs and, when reordered, their positions in the row
    device = query.device
    calls = length_groups(lengths, GROUP_MAX_TOKENS, GROUP_SLACK)  # read at call time: the bench switches it off
    in_row_order = all(len(c) == 1 for c in calls)
    if in_row_order:
        calls.sort()  # no group formed: one call per segment in row order, no reordering below
    for call in calls:
        if len(call) == 1:
            a, n = starts[call[0]], lengths[call[0]]
            o, _ = sdpa_attention_forward(
                module, query[:, :, a : a + n], key[:, :, a : a + n], value[:, :, a : a + n], None,
                dropout=dropout, scaling=scaling, is_causal=True,
            )
            outs.append(o[0])
            if not in_row_order:
                where.append(torch.arange(a, a + n, device=device))
            continue
        first = torch.tensor([starts[i] for i in call], device=device)
        count = torch.tensor([lengths[i] for i in call], device=device)
        offset = torch.arange(lengths[call[0]], device=device)
        real = offset[None, :] < count[:, None]
        index = torch.minimum(first[:, None] + offset[None, :], (first + count - 1)[:, None])  # pad: repeat the last token
        o, _ = sdpa_attention_forward(module, _gather(query, index), _gather(key, index), _gather(value, index), None,
                                      dropout=dropout, scaling=scaling, is_causal=True)
        outs.append(o[real])
        where.append(index[real])
    if in_row_order:
        return torch.cat(outs)[None], None
    positions = torch.cat(where)
    order = torch.empty_like(positions)
    order[positions] = torch.arange(positions.numel(), device=device)
    return torch.cat(outs)[order][None], None


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(1, heads, tokens, dim) -> (segments, heads, width, dim): the row's tokens at ``index`` (segments × width)."""
    return x[0][:, index].transpose(0, 1)


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
