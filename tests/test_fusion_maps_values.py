"""Every feature-map operator against its paper's equations, written out here on the operator's own weights.

Legend: b batch, c channels, h height, w width of a map, k kernel size.

Each test randomises all parameters and norm statistics of the operator (no neutral or saturated setting),
feeds non-trivial float64 inputs on a non-square map, and compares with a computation that uses only the
operator's weight tensors and elementary functions (no call into the operator's submodules). Norms are in
eval mode, so a batch norm is the affine map of its running statistics, written out below.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fuselab import create_fusion
from fuselab.fusion.maps import eca_kernel_size

B, C, H, W = 2, 8, 5, 6
TWO = {"a": C, "b": C}


def randomised(name: str, dims: dict[str, int], *, seed: int = 0, **options) -> nn.Module:
    """The operator in float64 eval mode with every parameter and running statistic drawn at random."""
    torch.manual_seed(seed)
    op = create_fusion(name, dims=dims, **options).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for module in op.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.3 * torch.randn(module.num_features, generator=g, dtype=torch.float64))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=g, dtype=torch.float64))
    return op.eval()


def inputs(dims: dict[str, int], *, seed: int = 7) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, d, H, W, generator=g, dtype=torch.float64) + 0.3 for m, d in dims.items()}


def conv1x1(x: Tensor, conv: nn.Module) -> Tensor:
    """A 1x1 convolution (Conv2d or a Linear on the channel axis) written as a sum over input channels."""
    weight = conv.weight.reshape(conv.weight.shape[0], -1)  # (out, in)
    y = torch.einsum("oi,bihw->bohw", weight, x)
    return y if conv.bias is None else y + conv.bias.view(1, -1, 1, 1)


def batch_norm(x: Tensor, bn: nn.Module) -> Tensor:
    """Eval-mode batch norm: (x - running mean) / sqrt(running var + eps) * gamma + beta, per channel."""
    shape = (1, -1, 1, 1)
    scale = bn.weight.view(shape) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale + bn.bias.view(shape)


def gap(x: Tensor) -> Tensor:
    return x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)


def gmp(x: Tensor) -> Tensor:
    return x.amax(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)


def check(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_inputs_and_weights_are_not_neutral() -> None:
    """The settings below exercise every branch: gates are away from 0 and 1, hidden units of both signs."""
    op = randomised("se-add", TWO, reduction=4)
    x = inputs(TWO)["a"]
    gate_logits = conv1x1(F.relu(conv1x1(gap(x), op.se["a"].fc[0])), op.se["a"].fc[2])
    assert 0.05 < torch.sigmoid(gate_logits).min() and torch.sigmoid(gate_logits).max() < 0.95
    hidden = conv1x1(gap(x), op.se["a"].fc[0])
    assert (hidden < 0).any() and (hidden > 0).any()


# --- attention merges ----------------------------------------------------------------------------------


def test_se_add_is_the_sum_of_squeeze_excitation_per_modality() -> None:
    """ESANet: SE(x) = x * sigmoid(W_2 relu(W_1 GAP(x) + b_1) + b_2); z = SE_a(a) + SE_b(b)."""
    op = randomised("se-add", TWO, reduction=4)
    xs = inputs(TWO)

    def se(x: Tensor, fc: nn.Sequential) -> Tensor:
        return x * torch.sigmoid(conv1x1(torch.relu(conv1x1(gap(x), fc[0])), fc[2]))

    check(op(xs), se(xs["a"], op.se["a"].fc) + se(xs["b"], op.se["b"].fc))


def test_acm_reweights_each_modality_by_its_global_average() -> None:
    """ACNet: z = sum_m x_m * sigmoid(W_m GAP(x_m) + b_m)."""
    op = randomised("acm", TWO)
    xs = inputs(TWO)
    expected = sum(x * torch.sigmoid(conv1x1(gap(x), op.attention[m][0])) for m, x in xs.items())
    check(op(xs), expected)


def test_cbam_channel_then_spatial_gate_on_the_concatenation() -> None:
    """CBAM eq. 2-3: M_c = sigmoid(MLP(GAP x) + MLP(GMP x)); M_s = sigmoid(conv7([mean_c x', max_c x']))."""
    op = randomised("cbam", TWO, reduction=2)
    xs = inputs(TWO)
    x = torch.cat([xs["a"], xs["b"]], dim=1)  # (B, 2C, H, W)

    def mlp(v: Tensor) -> Tensor:
        return conv1x1(torch.relu(conv1x1(v, op.mlp[0])), op.mlp[2])

    x1 = x * torch.sigmoid(mlp(gap(x)) + mlp(gmp(x)))
    pooled = torch.cat([x1.mean(1, keepdim=True), x1.amax(1, keepdim=True)], dim=1)  # (B, 2, H, W): [mean, max]
    k = op.spatial.kernel_size[0]
    x2 = x1 * torch.sigmoid(F.conv2d(pooled, op.spatial.weight, op.spatial.bias, padding=k // 2))
    check(op(xs), conv1x1(x2, op.proj))


def test_eca_gate_is_a_1d_convolution_across_neighbouring_channels() -> None:
    """ECA-Net: y = GAP(x) per channel, y'_c = sum_j w_j y_{c + j - k // 2} (zero beyond the ends),
    x' = x * sigmoid(y'); here on [a, b], then the 1x1 projection."""
    op = randomised("eca", TWO)
    assert op.kernel_size == 3  # summed width 16
    xs = inputs(TWO)
    x = torch.cat([xs["a"], xs["b"]], dim=1)  # (B, 2C, H, W)
    y = x.mean(dim=(2, 3))  # (B, 2C)
    w, k, n = op.conv.weight.view(-1), op.kernel_size, x.shape[1]
    mixed = torch.zeros_like(y)
    for c in range(n):
        for j in range(k):
            if 0 <= c + j - k // 2 < n:
                mixed[:, c] += w[j] * y[:, c + j - k // 2]
    check(op(xs), conv1x1(x * torch.sigmoid(mixed).view(B, n, 1, 1), op.proj))


def test_eca_kernel_size_is_at_least_three() -> None:
    """Below a summed width of 8 the paper's rule gives 1 (no interaction between channels); clamped to 3."""
    assert [eca_kernel_size(c) for c in (1, 2, 4, 7, 8, 16, 64, 512)] == [3, 3, 3, 3, 3, 3, 3, 5]
    assert create_fusion("eca", dims={"a": 2, "b": 2}).kernel_size == 3
    assert create_fusion("eca", dims={"a": 2, "b": 2}, kernel_size=1).kernel_size == 1  # an explicit size stays


def ms_cam(x: Tensor, attention: nn.Module) -> Tensor:
    """AFF's multi-scale channel attention logits: L(x) + G(GAP x), each Conv-BN-ReLU-Conv-BN (no conv bias)."""

    def branch(v: Tensor, seq: nn.Sequential) -> Tensor:
        return batch_norm(conv1x1(torch.relu(batch_norm(conv1x1(v, seq[0]), seq[1])), seq[3]), seq[4])

    return branch(x, attention.local_att) + branch(gap(x), attention.global_att)


def test_aff_weights_the_two_inputs_by_ms_cam_of_their_sum() -> None:
    """AFF eq.: z = M(a + b) * a + (1 - M(a + b)) * b, M = sigmoid(L + G); the first (sorted) input takes M."""
    op = randomised("aff", TWO)
    xs = inputs(TWO)
    a, b = xs["a"], xs["b"]
    m = torch.sigmoid(ms_cam(a + b, op.attention))
    assert 0.02 < m.min() and m.max() < 0.98
    check(op(xs), m * a + (1 - m) * b)


def test_iaff_iterates_with_a_second_ms_cam() -> None:
    """iAFF: u = M1(a + b) a + (1 - M1(a + b)) b, z = M2(u) a + (1 - M2(u)) b, M1 and M2 separate MS-CAMs."""
    op = randomised("iaff", TWO)
    xs = inputs(TWO)
    a, b = xs["a"], xs["b"]
    m1 = torch.sigmoid(ms_cam(a + b, op.attention1))
    u = m1 * a + (1 - m1) * b
    m2 = torch.sigmoid(ms_cam(u, op.attention2))
    check(op(xs), m2 * a + (1 - m2) * b)


def test_sk_selects_between_the_modalities_per_channel() -> None:
    """SKNet fuse / select: s = GAP(a + b), h = relu(BN(W s)), [l_a, l_b] = W_sel h, z = softmax(l) . [a, b]."""
    op = randomised("sk", TWO)
    xs = inputs(TWO)
    a, b = xs["a"], xs["b"]
    h = torch.relu(batch_norm(conv1x1(gap(a + b), op.reduce[0]), op.reduce[1]))  # (B, hidden, 1, 1)
    logits = conv1x1(h, op.select)  # (B, 2C, 1, 1): [l_a, l_b]
    la, lb = logits[:, :C], logits[:, C:]
    wa = torch.exp(la) / (torch.exp(la) + torch.exp(lb))
    check(op(xs), wa * a + (1 - wa) * b)


def test_three_modality_aff_and_sk_are_softmax_weighted_sums() -> None:
    """The documented M-way rules: aff's softmax over [logits, 0]; sk's softmax over the M logit vectors."""
    dims = {"a": C, "b": C, "c": C}
    xs = inputs(dims)
    stacked = torch.stack([xs["a"], xs["b"], xs["c"]])  # (M, B, C, H, W)
    op = randomised("aff", dims)
    logits = ms_cam(stacked.sum(0), op.attention)  # (B, 2C, H, W)
    full = torch.stack([logits[:, :C], logits[:, C:], torch.zeros_like(logits[:, :C])])
    check(op(xs), (full.softmax(0) * stacked).sum(0))
    op = randomised("sk", dims)
    h = torch.relu(batch_norm(conv1x1(gap(stacked.sum(0)), op.reduce[0]), op.reduce[1]))
    logits = conv1x1(h, op.select).view(B, 3, C, 1, 1).transpose(0, 1)
    check(op(xs), (logits.softmax(0) * stacked).sum(0))


# --- CMX -----------------------------------------------------------------------------------------------


def linear(x: Tensor, layer: nn.Linear) -> Tensor:
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def layer_norm(x: Tensor, ln: nn.LayerNorm) -> Tensor:
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


@pytest.mark.parametrize("num_heads", [1, 2])
def test_ffm_cross_path_and_channel_embedding(num_heads: int) -> None:
    """CMX FFM: [y, u] = relu(W x); K, V = W_kv u; ctx = softmax over keys of K^T V / sqrt(e); each modality's
    u reads the other's ctx; x' = LN(x + W_end [y, u ctx]); z = BN(W_res x' + BN(W_3 relu(DW(W_1 x'))))."""
    op = randomised("ffm", TWO, num_heads=num_heads)
    xs = inputs(TWO)
    e = C // num_heads
    tokens = {m: x.flatten(2).transpose(1, 2) for m, x in xs.items()}  # (B, N, C)
    direct, query, ctx = {}, {}, {}
    for m, t in tokens.items():
        y, u = torch.relu(linear(t, op.channel_proj[m])).split(C, dim=-1)
        direct[m] = y
        query[m] = u.reshape(B, H * W, num_heads, e).transpose(1, 2)  # (B, heads, N, e)
        k, v = linear(u, op.kv[m]).split(C, dim=-1)
        k = k.reshape(B, H * W, num_heads, e).transpose(1, 2)
        v = v.reshape(B, H * W, num_heads, e).transpose(1, 2)
        ctx[m] = torch.softmax(k.transpose(-2, -1) @ v / e**0.5, dim=-2)  # (B, heads, e, e)
    outs = []
    for m, other in (("a", "b"), ("b", "a")):
        attended = (query[m] @ ctx[other]).transpose(1, 2).reshape(B, H * W, C)
        residual = tokens[m] + linear(torch.cat([direct[m], attended], dim=-1), op.end_proj[m])
        outs.append(layer_norm(residual, op.token_norm[m]))
    x = torch.cat(outs, dim=-1).transpose(1, 2).reshape(B, 2 * C, H, W)
    emb = op.embed
    hidden = conv1x1(x, emb.embed[0])
    hidden = torch.relu(F.conv2d(hidden, emb.embed[1].weight, emb.embed[1].bias, padding=1, groups=hidden.shape[1]))
    inner = batch_norm(conv1x1(hidden, emb.embed[3]), emb.embed[4])
    check(op(xs), batch_norm(conv1x1(x, emb.residual) + inner, emb.norm))


def test_rectify_adds_the_other_stream_reweighted_by_its_channel_and_spatial_weights() -> None:
    """CMX CM-FRM: w_c = sigmoid(MLP([GAP, GMP]([a, b]))) split [w_c,a, w_c,b]; w_s = sigmoid(conv(relu(conv
    [a, b]))) split [w_s,a, w_s,b]; a' = a + l_c w_c,b b + l_s w_s,b b, b' = b + l_c w_c,a a + l_s w_s,a a."""
    lambda_c, lambda_s = 0.3, 0.7
    op = randomised("rectify", TWO, lambda_c=lambda_c, lambda_s=lambda_s)
    xs = inputs(TWO)
    a, b = xs["a"], xs["b"]
    x = torch.cat([a, b], dim=1)  # (B, 2C, H, W)
    pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)  # (B, 4C)
    channel = torch.sigmoid(linear(torch.relu(linear(pooled, op.channel_weights[0])), op.channel_weights[2]))
    wc_a, wc_b = channel[:, :C].view(B, C, 1, 1), channel[:, C:].view(B, C, 1, 1)
    spatial = torch.sigmoid(conv1x1(torch.relu(conv1x1(x, op.spatial_weights[0])), op.spatial_weights[2]))
    ws_a, ws_b = spatial[:, :1], spatial[:, 1:]  # (B, 1, H, W) each
    assert spatial.std(dim=(2, 3)).min() > 0.01  # the spatial weights really vary over the map
    out = op(xs)
    check(out["a"], a + lambda_c * wc_b * b + lambda_s * ws_b * b)
    check(out["b"], b + lambda_c * wc_a * a + lambda_s * ws_a * a)


# --- change detection ---------------------------------------------------------------------------------


def conv_bn_relu(x: Tensor, seq: nn.Sequential) -> Tensor:
    conv = seq[0]
    y = F.conv2d(x, conv.weight, conv.bias, padding=conv.kernel_size[0] // 2)
    return torch.relu(batch_norm(y, seq[1]))


def test_tfi_enhances_each_input_by_the_difference_and_adds_the_difference_back() -> None:
    """TFI-GR: d = CBR(|a - b|), a' = CBR(a * d + a), b' = CBR(b * d + b), z = CBR_1x1(d + CBR([a', b']))."""
    op = randomised("tfi", TWO)
    xs = inputs(TWO)
    a, b = xs["a"], xs["b"]
    d = conv_bn_relu((a - b).abs(), op.conv_diff)
    a2 = conv_bn_relu(a * d + a, op.enhance["a"])
    b2 = conv_bn_relu(b * d + b, op.enhance["b"])
    fused = conv_bn_relu(torch.cat([a2, b2], dim=1), op.conv_cat)
    check(op(xs), conv_bn_relu(d + fused, op.conv_out))


def test_mixing_is_a_grouped_convolution_over_interleaved_channels() -> None:
    """TinyCD: group c sees (a_c, b_c); y_c = sum_m conv_k(x_m,c; w_c,m) + bias_c; PReLU; instance norm."""
    op = randomised("mixing", TWO)
    xs = inputs(TWO)
    conv, prelu = op.mix[0], op.mix[1]
    k = conv.kernel_size[0]
    channels = []
    for c in range(C):
        pair = torch.stack([xs["a"][:, c], xs["b"][:, c]], dim=1)  # (B, 2, H, W): a's channel first
        channels.append(F.conv2d(pair, conv.weight[c : c + 1], conv.bias[c : c + 1], padding=k // 2))
    y = torch.cat(channels, dim=1)  # (B, C, H, W)
    y = torch.where(y > 0, y, prelu.weight * y)
    mean, var = y.mean((2, 3), keepdim=True), y.var((2, 3), unbiased=False, keepdim=True)
    check(op(xs), (y - mean) / torch.sqrt(var + op.mix[2].eps))


def test_concat_diff_zero_pads_a_narrower_input() -> None:
    """[a, pad(b), |a - pad(b)|] then the convolution; pad(b) is b with zero channels appended."""
    dims = {"a": C, "b": 5}
    op = randomised("concat-diff", dims, out_dim=3)
    xs = inputs(dims)
    a, b = xs["a"], F.pad(xs["b"], (0, 0, 0, 0, 0, C - 5))
    check(op(xs), conv1x1(torch.cat([a, b, (a - b).abs()], dim=1), op.conv))


# --- the difference family: Siamese at any width -------------------------------------------------------


WIDTHS = [({"a": C, "b": C}, 4), ({"a": C, "b": 5}, None), ({"a": C, "b": 5}, 12), ({"a": 3, "b": C}, 4)]


@pytest.mark.parametrize(("dims", "out_dim"), WIDTHS)
def test_diff_and_abs_diff_are_one_shared_map_then_the_difference(dims: dict, out_dim: int | None) -> None:
    """z = P pad(b) - P pad(a) and |P pad(a) - P pad(b)|, P one 1x1 projection to out_dim (none if it fits)."""
    xs = inputs(dims)
    width = max(dims.values())
    padded = {m: F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1])) for m, x in xs.items()}
    for name in ("diff", "abs-diff"):
        op = randomised(name, dims, out_dim=out_dim)
        if out_dim is None or out_dim == width:
            assert not list(op.parameters())
            p = padded
        else:
            assert sum(t.numel() for t in op.parameters()) == (width + 1) * out_dim  # one projection
            p = {m: conv1x1(x, op.proj) for m, x in padded.items()}
        expected = p["b"] - p["a"] if name == "diff" else (p["a"] - p["b"]).abs()
        check(op(xs), expected)


@pytest.mark.parametrize("out_dim", [None, 4, 8, 13])
@pytest.mark.parametrize("n_modalities", [2, 3])
def test_equal_inputs_give_exactly_zero(out_dim: int | None, n_modalities: int) -> None:
    dims = {f"m{i}": C for i in range(n_modalities)}
    x = inputs({"x": C})["x"]
    for name in ("diff", "abs-diff"):
        op = randomised(name, dims, out_dim=out_dim)
        z = op({m: x for m in dims})
        assert z.shape == (B, out_dim or C, H, W)
        assert torch.equal(z, torch.zeros_like(z)), f"{name}: max |z| = {z.abs().max()}"


@pytest.mark.parametrize(("dims", "out_dim"), WIDTHS)
def test_diff_is_antisymmetric_and_abs_diff_symmetric(dims: dict, out_dim: int | None) -> None:
    """Swapping the roles of the two inputs: diff changes sign, abs-diff stays (inputs of the common width,
    the narrower one's extra channels zero, so that the swap is a valid input)."""
    narrow = min(dims.values())
    x, y = inputs({"x": narrow, "y": narrow}).values()
    xs = {m: F.pad(x, (0, 0, 0, 0, 0, d - narrow)) for m, d in dims.items()}
    ys = {m: F.pad(y, (0, 0, 0, 0, 0, d - narrow)) for m, d in dims.items()}
    forward = {"a": xs["a"], "b": ys["b"]}
    swapped = {"a": ys["a"], "b": xs["b"]}
    diff = randomised("diff", dims, out_dim=out_dim)
    assert torch.equal(diff(forward), -diff(swapped))
    absdiff = randomised("abs-diff", dims, out_dim=out_dim)
    assert torch.equal(absdiff(forward), absdiff(swapped))
    assert absdiff(forward).abs().max() > 0.1


def test_independent_projections_are_a_named_option_and_not_a_siamese_difference() -> None:
    dims = {"a": C, "b": C}
    x = inputs({"x": C})["x"]
    op = randomised("diff", dims, out_dim=4, projection="independent")
    assert set(dict(op.named_parameters())) == {"proj.a.weight", "proj.a.bias", "proj.b.weight", "proj.b.bias"}
    assert op({"a": x, "b": x}).abs().max() > 0.1  # documented: equal inputs do not give 0
    with pytest.raises(ValueError, match="projection must be 'shared' or 'independent'"):
        create_fusion("abs-diff", dims=dims, projection="separate")


# --- exchanges at unequal widths: true swaps ----------------------------------------------------------


def test_channel_exchange_p_at_unequal_widths_swaps_the_channels_both_have() -> None:
    dims = {"a": C, "b": 5}
    xs = inputs(dims)
    op = create_fusion("channel-exchange-p", dims=dims)
    assert not list(op.parameters())
    out = op(xs)
    a, b = xs["a"], xs["b"]
    for ch in range(C):
        if ch % 2 == 0 and ch < 5:  # exchanged and present in both: a true swap
            assert torch.equal(out["a"][:, ch], b[:, ch]) and torch.equal(out["b"][:, ch], a[:, ch])
        else:  # not exchanged, or channel 6 that b lacks: a keeps its own
            assert torch.equal(out["a"][:, ch], a[:, ch])
    for ch in (1, 3):
        assert torch.equal(out["b"][:, ch], b[:, ch])


def test_channel_exchange_p_of_three_unequal_modalities_receives_the_mean_of_those_that_have_the_channel() -> None:
    dims = {"a": C, "b": 6, "c": 3}
    xs = inputs(dims)
    out = create_fusion("channel-exchange-p", dims=dims)(xs)
    a, b, c = xs["a"], xs["b"], xs["c"]
    expected_a = a.clone()
    expected_a[:, [0, 2]] = (b[:, [0, 2]] + c[:, [0, 2]]) / 2  # both others have channels 0, 2
    expected_a[:, 4] = b[:, 4]  # only b has channel 4; channel 6: nobody else, a keeps it
    check(out["a"], expected_a)
    expected_c = c.clone()
    expected_c[:, [0, 2]] = (a[:, [0, 2]] + b[:, [0, 2]]) / 2
    check(out["c"], expected_c)


def test_spatial_exchange_at_unequal_widths_swaps_the_shared_channels_of_every_other_column() -> None:
    dims = {"a": C, "b": 5}
    xs = inputs(dims)
    op = create_fusion("spatial-exchange", dims=dims)
    assert not list(op.parameters())
    out = op(xs)
    a, b = xs["a"], xs["b"]
    for col in range(W):
        if col % 2 == 0:
            assert torch.equal(out["a"][:, :5, :, col], b[..., col])
            assert torch.equal(out["a"][:, 5:, :, col], a[:, 5:, :, col])  # channels b lacks stay a's
            assert torch.equal(out["b"][..., col], a[:, :5, :, col])
        else:
            assert torch.equal(out["a"][..., col], a[..., col]) and torch.equal(out["b"][..., col], b[..., col])
