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


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's reference, float case
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attention_mask_combined_with_key_padding_matches_torch(kind):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(ref).eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    allowed = torch.rand(5, 7) > 0.3
    allowed[:, 0] = True  # every query keeps at least one key
    if kind == "bool":
        ours_mask, torch_mask = allowed, ~allowed  # fuselab: True = may attend; torch: True = masked out
    else:
        ours_mask = torch_mask = torch.randn(5, 7)  # additive
    expected, _ = ref(q, kv, kv, key_padding_mask=pad, attn_mask=torch_mask, need_weights=False)
    got = ours(q, kv, kv, key_padding_mask=pad, attn_mask=ours_mask)
    assert torch.allclose(got, expected, atol=1e-5)
    # the padded keys are ignored: changing them changes nothing
    kv2 = kv.clone()
    kv2[0, 5:] = 100.0
    assert torch.allclose(ours(q, kv2, kv2, key_padding_mask=pad, attn_mask=ours_mask)[0], got[0], atol=1e-5)


def test_defaults_self_attention_and_value_width_follow_the_key_width():
    torch.manual_seed(0)
    m = MultiHeadAttention(8, 2, kdim=6)
    assert (m.k_proj.in_features, m.v_proj.in_features, m.q_proj.in_features) == (6, 6, 8)
    x, kv = torch.randn(2, 3, 8), torch.randn(2, 4, 6)
    assert torch.equal(m(x, kv), m(x, kv, kv))  # value defaults to key
    s = MultiHeadAttention(8, 2)
    assert torch.equal(s(x), s(x, x, x))  # key and value default to the query
    assert all(p.bias is None for p in MultiHeadAttention(8, 2, bias=False).children())


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    m = MultiHeadAttention(8, 2, dropout=0.5)
    plain = MultiHeadAttention(8, 2)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(4, 6, 8)
    m.eval()
    assert torch.equal(m(x), plain.eval()(x))
    m.train()
    assert not torch.allclose(m(x), plain(x))


def test_initialisation_is_xavier_over_the_stacked_projection_with_zero_biases():
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 4)
    stacked = torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]).detach()  # (3d, d)
    bound = (6 / (64 + 3 * 64)) ** 0.5  # Xavier-uniform over fan_in d, fan_out 3d, as nn.MultiheadAttention
    assert stacked.abs().max() <= bound and stacked.abs().max() > 0.9 * bound
    assert stacked.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    for p in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
        assert torch.count_nonzero(p.bias) == 0
    cross = MultiHeadAttention(64, 4, kdim=32)  # unequal widths: each projection on its own
    for p in (cross.q_proj, cross.k_proj, cross.v_proj):
        fan_out, fan_in = p.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert bound >= p.weight.abs().max().item() > 0.9 * bound


def test_from_torch_copies_a_module_without_biases_and_with_separate_widths():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, bias=False, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(ref).eval()
    assert ours.q_proj.bias is None
    x = torch.randn(2, 3, 8)
    assert torch.allclose(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-6)


def test_attention_flops_with_a_value_width_of_its_own():
    assert attention_flops(2, 3, 5, 7, 4, value_dim=6) == 2 * 2 * 3 * 5 * 7 * 4 + 2 * 2 * 3 * 5 * 7 * 6
    assert attention_flops(1, 1, 1, 1, 1) == 4


def test_the_cpu_attention_flop_formulas_are_registered_once_and_count_forward_and_backward():
    from torch.utils import flop_counter

    from fuselab.layers import attention as module

    aten = torch.ops.aten
    ops = (aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward)
    saved = {op: flop_counter.flop_registry.pop(op) for op in ops if op in flop_counter.flop_registry}
    try:
        module._register_cpu_sdpa_flops()
        assert all(op in flop_counter.flop_registry for op in ops)
        first = [flop_counter.flop_registry[op] for op in ops]
        module._register_cpu_sdpa_flops()  # a second import-time call leaves the registered formulas alone
        assert [flop_counter.flop_registry[op] for op in ops] == first
        b, n, s, d, h = 2, 6, 5, 16, 4
        m = MultiHeadAttention(d, h)
        q, kv = torch.randn(b, n, d, requires_grad=True), torch.randn(b, s, d)
        with FlopCounterMode(display=False) as counter:
            m(q, kv).sum().backward()
        sdpa = counter.get_flop_counts()["Global"]
        shape_q, shape_kv = (b, h, n, d // h), (b, h, s, d // h)
        assert sdpa[ops[0]] == attention_flops(b, h, n, s, d // h)
        assert sdpa[ops[1]] == flop_counter.sdpa_backward_flop_count(shape_q, shape_q, shape_kv, shape_kv)
    finally:
        flop_counter.flop_registry.update(saved)


def test_from_torch_copies_dropout_random_biases_and_a_missing_output_bias():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    ours = MultiHeadAttention.from_torch(ref).eval()
    assert ours.dropout == 0.3 and ours.heads == 2
    x = torch.randn(2, 3, 8)
    assert torch.allclose(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-6)
    ref.out_proj.bias = None  # input biases only: still copied
    ours = MultiHeadAttention.from_torch(ref).eval()
    assert ours.q_proj.bias is not None and torch.count_nonzero(ours.out_proj.bias) == 0
    assert torch.allclose(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-6)
    assert MultiHeadAttention(32).heads == 8  # the default


def test_keys_and_values_of_different_lengths_are_one_clear_error():
    """The CPU SDPA kernel returns a result for such shapes without complaint; the layer refuses them."""
    attn = MultiHeadAttention(8, heads=2)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"^attention: key \(2, 5, 8\) and value \(2, 4, 8\) need the same batch"):
        attn(q, k, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"query \(3, 3, 8\) the same batch"):
        attn(torch.randn(3, 3, 8), k)
    assert attn(q, k, torch.randn(2, 5, 8)).shape == (2, 3, 8)  # same length, another value: fine
