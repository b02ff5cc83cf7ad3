from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fuselab.layers import MultiHeadAttention, attention_flops


@pytest.mark.parametrize("heads", [1, 4])
def test_matches_torch_multihead_attention(heads):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, heads, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(ref).eval()
    x = torch.randn(3, 7, 32)
    expected, _ = ref(x, x, x, need_weights=False)
    assert torch.allclose(ours(x), expected, atol=1e-6)


def test_cross_attention_with_kdim_vdim_matches_torch():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 2, kdim=10, vdim=12, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(ref).eval()
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 9, 10), torch.randn(2, 9, 12)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    expected, _ = ref(q, k, v, key_padding_mask=pad, need_weights=False)
    assert torch.allclose(ours(q, k, v, key_padding_mask=pad), expected, atol=1e-6)


def test_heads_keep_the_parameter_count_and_change_the_output():
    torch.manual_seed(0)
    one = MultiHeadAttention(32, 1)
    eight = MultiHeadAttention(32, 8)
    eight.load_state_dict(one.state_dict())
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in eight.parameters()) == 4 * 32 * 32 + 4 * 32
    x = torch.randn(2, 6, 32)
    assert not torch.allclose(one(x), eight(x), atol=1e-4)


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="heads=3 must be a positive divisor of the width 32"):
        MultiHeadAttention(32, 3)


def test_flop_counter_counts_attention_on_cpu():
    b, n, s, d, h = 2, 10, 12, 32, 4
    m = MultiHeadAttention(d, h)
    q, kv = torch.randn(b, n, d), torch.randn(b, s, d)
    with FlopCounterMode(display=False) as counter:
        m(q, kv)
    linear = 2 * b * n * d * d * 2 + 2 * b * s * d * d * 2  # q and out on n tokens, k and v on s tokens
    assert counter.get_total_flops() == linear + attention_flops(b, h, n, s, d // h)
    assert attention_flops(b, h, n, s, d // h) == 4 * b * n * s * d
