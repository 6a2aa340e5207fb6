"""Per-segment attention for padding-free rows: grouped short segments compute exactly the per-segment result."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from affinage.train.attention import GROUP_MAX_TOKENS, GROUP_SLACK, _varlen_sdpa, length_groups


class _Module(torch.nn.Module):
    """What transformers' SDPA path reads from an attention module: the GQA factor."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def _reference(query, key, value, lengths, groups):
    """Causal SDPA on each segment alone (keys and values repeated for GQA)."""
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    outs, a = [], 0
    for n in lengths:
        if n:
            outs.append(F.scaled_dot_product_attention(query[:, :, a:a + n], key[:, :, a:a + n], value[:, :, a:a + n], is_causal=True))
        a += n
    return torch.cat(outs, dim=2).transpose(1, 2)  # (1, tokens, heads, dim), as transformers returns it


random.seed(0)
CASES = {
    "equal short": [64] * 12,
    "mixed short": [random.randint(5, GROUP_MAX_TOKENS) for _ in range(15)],
    "long and short": [300, 17, 90, 1, 128, 129, 64, 0, 33, 250],
    "all long": [200, 300, 150],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_grouped_segments_equal_attention_on_each_segment_alone(name):
    lengths, heads, kv_heads, dim = CASES[name], 4, 2, 16
    total = sum(lengths)
    torch.manual_seed(1)
    q = torch.randn(1, heads, total, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))])
    got, _ = _varlen_sdpa(_Module(heads // kv_heads), q, k, v, None, cu_seq_lens_q=cu)
    want = _reference(q, k, v, lengths, heads // kv_heads)
    assert got.shape == want.shape == (1, total, heads, dim)
    # float64: the two paths differ only by summation order (measured max 2e-16 on these cases)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    weights = torch.randn_like(want)
    g_got = torch.autograd.grad((got * weights).sum(), (q, k, v))
    g_want = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_length_groups_cover_every_segment_once_within_the_padding_bound():
    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.randint(1, 2 * GROUP_MAX_TOKENS) for _ in range(rng.randint(1, 40))]
        calls = length_groups(lengths)
        assert sorted(i for c in calls for i in c) == list(range(len(lengths)))
        for call in calls:
            if len(call) > 1:
                width = max(lengths[i] for i in call)
                assert width <= GROUP_MAX_TOKENS and lengths[call[0]] == width
                assert len(call) * width ** 2 <= GROUP_SLACK * sum(lengths[i] ** 2 for i in call)
    # many equal short samples: one call instead of 32; long ones keep a call each
    assert length_groups([64] * 32) == [list(range(32))]
    assert length_groups([500, 400]) == [[0], [1]]
