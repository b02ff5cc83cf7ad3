"""Feature-map fusion operators: every registered operator that accepts maps, plus hand-computed values.

Legend: b batch, c channels, h height, w width of a map.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fuselab import create_fusion, fusion_info, list_fusions
from fuselab.fusion.maps import eca_kernel_size

B, C, H, W = 2, 8, 6, 6
MAP_IDS = [name for name in list_fusions() if "map" in fusion_info(name).forms]
# Reductions that divide the tiny test widths (the defaults of 16 would not).
OPTIONS = {"se-add": {"reduction": 4}, "cbam": {"reduction": 2}}
EQUAL = {"rgb": C, "depth": C}
UNEQUAL = {"rgb": C, "depth": 6, "thermal": 4}


def build(name: str, dims: dict[str, int], **options) -> nn.Module:
    torch.manual_seed(0)
    return create_fusion(name, dims=dims, **{**OPTIONS.get(name, {}), **options})


def maps(dims: dict[str, int], *, seed: int = 0, requires_grad: bool = False) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, d, H, W, generator=g).requires_grad_(requires_grad) for m, d in dims.items()}


def outputs(out: Tensor | dict[str, Tensor]) -> list[Tensor]:
    return [out] if isinstance(out, Tensor) else [out[m] for m in sorted(out)]


def probe_loss(out: Tensor | dict[str, Tensor]) -> Tensor:
    """A fixed random projection of the output: every output element matters, whatever its mean."""
    g = torch.Generator().manual_seed(123)
    return sum((y * torch.randn(y.shape, generator=g)).mean() for y in outputs(out))


def is_merge(name: str) -> bool:
    return fusion_info(name).contract == "merge"


def test_the_zoo_is_registered() -> None:
    expected = {
        "diff", "abs-diff", "concat-diff", "tfi", "se-add", "acm", "cbam", "eca", "aff", "iaff", "sk", "ffm",
        "mixing", "rectify", "spatial-exchange", "channel-exchange-p",
        "concat", "sum", "mean", "max", "product",
    }  # fmt: skip
    assert expected <= set(MAP_IDS)
    for name in ("rectify", "spatial-exchange", "channel-exchange-p"):
        info = fusion_info(name)
        assert (info.contract, info.kind) == ("exchange", "standalone")
    for name in expected - {"concat", "sum", "mean", "max", "product"}:
        info = fusion_info(name)
        assert info.forms == ("map",), name
        assert info.multimodal_rule and info.paper and info.reference and info.formula, name
    assert fusion_info("diff").asymmetric and "order" in fusion_info("diff").options


@pytest.mark.parametrize("n_modalities", [2, 3, 6])
@pytest.mark.parametrize("name", MAP_IDS)
def test_shape(name: str, n_modalities: int) -> None:
    dims = {f"mod{i}": C for i in range(n_modalities)}
    op = build(name, dims)
    out = op(maps(dims))
    if is_merge(name):
        assert out.shape == (B, op.out_dim, H, W)
        assert torch.isfinite(out).all()
    else:
        assert {m: y.shape for m, y in out.items()} == {m: (B, d, H, W) for m, d in dims.items()}


@pytest.mark.parametrize("name", MAP_IDS)
def test_shape_with_unequal_widths_and_out_dim(name: str) -> None:
    if is_merge(name):
        op = build(name, UNEQUAL, out_dim=12)
        assert op(maps(UNEQUAL)).shape == (B, 12, H, W)
    else:
        out = build(name, UNEQUAL)(maps(UNEQUAL))
        assert {m: y.shape for m, y in out.items()} == {m: (B, d, H, W) for m, d in UNEQUAL.items()}


@pytest.mark.parametrize("dims", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
@pytest.mark.parametrize("name", MAP_IDS)
def test_every_parameter_and_input_gets_a_gradient(name: str, dims: dict[str, int]) -> None:
    op = build(name, dims)
    xs = maps(dims, requires_grad=True)
    probe_loss(op(xs)).backward()
    for pname, p in op.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"
    for m, x in xs.items():
        assert x.grad is not None and x.grad.abs().sum() > 0, f"{name}: no gradient for input {m}"


@pytest.mark.parametrize("name", MAP_IDS)
def test_one_sgd_step_changes_the_output(name: str) -> None:
    op = build(name, EQUAL)
    if not list(op.parameters()):
        pytest.skip(f"{name} has no parameters at these widths")
    xs = maps(EQUAL)
    before = [y.detach().clone() for y in outputs(op(xs))]
    optimiser = torch.optim.SGD(op.parameters(), lr=0.1)
    probe_loss(op(xs)).backward()
    optimiser.step()
    after = outputs(op(xs))
    assert any(not torch.allclose(b, a, atol=1e-6) for b, a in zip(before, after))


@pytest.mark.parametrize("name", MAP_IDS)
def test_input_dict_order_changes_nothing(name: str) -> None:
    """forward sorts its inputs, so its result cannot depend on dict order; the operator's own merge /
    exchange, called directly with the inputs in another order, must not depend on it either."""
    op = build(name, UNEQUAL)
    xs = maps(UNEQUAL)
    shuffled = {m: xs[m] for m in ["thermal", "depth", "rgb"]}
    assert list(shuffled) != sorted(shuffled) and list(xs) != sorted(xs)
    expected = outputs(op(xs))
    assert all(torch.equal(e, s) for e, s in zip(expected, outputs(op(shuffled))))
    if name == "concat":  # concatenates in the order it is given, by definition; forward gives sorted order
        assert torch.equal(expected[0], torch.cat([xs[m] for m in sorted(xs)], dim=1))
        return
    direct = op.merge(shuffled) if is_merge(name) else op.exchange(shuffled)
    for e, d in zip(expected, outputs(direct)):
        torch.testing.assert_close(d, e)  # a sum over modalities may round differently in another order


def test_diff_follows_its_order_option_whatever_the_dict_order() -> None:
    op = create_fusion("diff", dims=EQUAL, order=["rgb", "depth"])
    xs = maps(EQUAL)
    for given in (xs, dict(reversed(list(xs.items())))):
        assert torch.equal(op(given), xs["depth"] - xs["rgb"])
        assert torch.equal(op.merge(given), xs["depth"] - xs["rgb"])


# Operators that normalise a globally pooled map with a batch norm, as their references do.
POOLED_BATCH_NORM = ("aff", "iaff", "sk")


@pytest.mark.parametrize("name", MAP_IDS)
def test_a_training_step_at_batch_size_1_runs_or_names_the_option_that_fixes_it(name: str) -> None:
    op = build(name, EQUAL).train()
    xs = {m: x[:1].requires_grad_() for m, x in maps(EQUAL).items()}  # (1, C, H, W)
    if name in POOLED_BATCH_NORM:
        with pytest.raises(ValueError, match=rf"^{name}: batch norm in training mode .* use norm='group'") as err:
            op(xs)
        assert "\n" not in str(err.value)
        op = build(name, EQUAL, norm="group").train()
    before = [y.detach().clone() for y in outputs(op(xs))]
    assert all(y.shape[0] == 1 and torch.isfinite(y).all() for y in before)
    optimiser = torch.optim.SGD(op.parameters(), lr=0.1) if list(op.parameters()) else None
    probe_loss(op(xs)).backward()
    for m, x in xs.items():
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, f"{name}: input {m}"
    for pname, p in op.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: gradient of {pname}"
    if optimiser is None:
        return
    optimiser.step()
    assert any(not torch.allclose(b, a, atol=1e-6) for b, a in zip(before, outputs(op(xs))))


@pytest.mark.parametrize("name", ["tfi", "ffm"])
def test_a_single_1x1_map_in_training_names_the_norm_option(name: str) -> None:
    xs = {m: torch.randn(1, C, 1, 1) for m in EQUAL}
    with pytest.raises(ValueError, match=rf"^{name}: .*a single 1x1 map gives one; use norm='group'"):
        build(name, EQUAL).train()(xs)
    assert build(name, EQUAL, norm="group").train()(xs).shape == (1, C, 1, 1)
    assert build(name, EQUAL).eval()(xs).shape == (1, C, 1, 1)  # eval mode uses running statistics


def test_mixing_rejects_1x1_maps_in_one_line() -> None:
    with pytest.raises(ValueError, match="^mixing: instance norm needs maps larger than 1x1"):
        build("mixing", EQUAL)({m: torch.randn(2, C, 1, 1) for m in EQUAL})


@pytest.mark.parametrize("name", MAP_IDS)
def test_mismatched_spatial_sizes_are_rejected(name: str) -> None:
    op = build(name, EQUAL)
    xs = {"rgb": torch.randn(B, C, H, W), "depth": torch.randn(B, C, H, W + 2)}
    with pytest.raises(ValueError, match="spatial size must match"):
        op(xs)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("se-add", {"reduction": 3}, "width 8 is not divisible by reduction 3"),
        ("cbam", {"reduction": 3}, "summed width 16 is not divisible by reduction 3"),
        ("aff", {"reduction": 3}, "width 8 is not divisible by reduction 3"),
        ("iaff", {"reduction": 3}, "width 8 is not divisible by reduction 3"),
        ("rectify", {"reduction": 3}, "width 8 is not divisible by reduction 3"),
        ("ffm", {"reduction": 3}, "width 8 is not divisible by reduction 3"),
        ("ffm", {"num_heads": 3}, "attention width 8 .* not divisible by num_heads 3"),
        ("tfi", {"kernel_size": 2}, "kernel_size must be a positive odd integer"),
        ("eca", {"kernel_size": 4}, "kernel_size must be a positive odd integer"),
        ("channel-exchange-p", {"p": 0.3}, "p must be 1/k"),
        ("spatial-exchange", {"p": 0.0}, "p must be a fraction"),
        ("diff", {"order": ["rgb", "rgb"]}, "order .* must list each modality exactly once"),
        ("diff", {"projection": "own"}, "projection must be 'shared' or 'independent'"),
        ("aff", {"norm": "layer"}, "norm must be one of 'batch', 'group' or an nn.Module class"),
        ("sk", {"norm": "instance"}, "norm must be one of 'batch', 'group'"),
    ],
)
def test_bad_options_are_rejected_when_built(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_fusion(name, dims=EQUAL, **options)


# --- hand computations -------------------------------------------------------------------------------


def test_diff_is_the_later_minus_the_earlier_modality() -> None:
    dims = {"a": C, "b": C, "c": C}
    xs = maps(dims)
    a, b, c = xs["a"], xs["b"], xs["c"]
    two = {"a": a, "b": b}
    assert torch.equal(create_fusion("diff", dims={"a": C, "b": C})(two), b - a)
    assert torch.equal(create_fusion("diff", dims={"a": C, "b": C}, order=["b", "a"])(two), a - b)
    torch.testing.assert_close(create_fusion("diff", dims=dims)(xs), c - (a + b) / 2)


def test_abs_diff_is_the_mean_absolute_pairwise_difference() -> None:
    dims = {"a": C, "b": C, "c": C}
    xs = maps(dims)
    a, b, c = xs["a"], xs["b"], xs["c"]
    assert torch.equal(create_fusion("abs-diff", dims={"a": C, "b": C})({"a": a, "b": b}), (a - b).abs())
    expected = ((a - b).abs() + (a - c).abs() + (b - c).abs()) / 3
    torch.testing.assert_close(create_fusion("abs-diff", dims=dims)(xs), expected)


@pytest.mark.parametrize("product", [False, True])
def test_concat_diff_with_a_known_convolution(product: bool) -> None:
    dims = {"a": 2, "b": 2}
    op = create_fusion("concat-diff", dims=dims, out_dim=3, product=product)
    n_in = 2 * (3 + int(product))
    weight = torch.arange(3 * n_in, dtype=torch.float32).reshape(3, n_in) / 10 - 1
    bias = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        op.conv.weight.copy_(weight.view(3, n_in, 1, 1))
        op.conv.bias.copy_(bias)
    xs = maps(dims)
    a, b = xs["a"], xs["b"]
    parts = [a, b, (a - b).abs()] + ([a * b] if product else [])
    features = torch.cat(parts, dim=1)  # (B, n_in, H, W)
    expected = torch.einsum("oi,bihw->bohw", weight, features) + bias.view(1, 3, 1, 1)
    torch.testing.assert_close(op(xs), expected)


def test_concat_diff_can_select_the_absolute_difference() -> None:
    op = create_fusion("concat-diff", dims={"a": 2, "b": 2})
    with torch.no_grad():
        op.conv.weight.zero_()
        op.conv.bias.zero_()
        op.conv.weight[0, 4] = 1.0  # channel 0 of |a - b|
        op.conv.weight[1, 5] = 1.0  # channel 1 of |a - b|
    xs = maps({"a": 2, "b": 2})
    assert torch.equal(op(xs), (xs["a"] - xs["b"]).abs())


def test_spatial_exchange_swaps_every_other_column() -> None:
    xs = maps(EQUAL)
    out = create_fusion("spatial-exchange", dims=EQUAL)(xs)
    rgb, depth = xs["rgb"], xs["depth"]
    for col in range(W):
        swapped = col % 2 == 0  # columns 0, 2, 4
        assert torch.equal(out["rgb"][..., col], (depth if swapped else rgb)[..., col])
        assert torch.equal(out["depth"][..., col], (rgb if swapped else depth)[..., col])


def test_spatial_exchange_of_three_modalities_receives_the_mean_of_the_others() -> None:
    dims = {"a": C, "b": C, "c": C}
    xs = maps(dims)
    out = create_fusion("spatial-exchange", dims=dims, p=1 / 3)(xs)
    a, b, c = xs["a"], xs["b"], xs["c"]
    for col in range(W):
        if col % 3 == 0:  # columns 0 and 3
            torch.testing.assert_close(out["a"][..., col], (b[..., col] + c[..., col]) / 2)
            torch.testing.assert_close(out["c"][..., col], (a[..., col] + b[..., col]) / 2)
        else:
            assert torch.equal(out["b"][..., col], b[..., col])


def test_channel_exchange_p_swaps_every_other_channel() -> None:
    xs = maps(EQUAL)
    out = create_fusion("channel-exchange-p", dims=EQUAL)(xs)
    rgb, depth = xs["rgb"], xs["depth"]
    for ch in range(C):
        swapped = ch % 2 == 0
        assert torch.equal(out["rgb"][:, ch], (depth if swapped else rgb)[:, ch])
        assert torch.equal(out["depth"][:, ch], (rgb if swapped else depth)[:, ch])


def test_channel_exchange_p_of_three_modalities() -> None:
    dims = {"a": C, "b": C, "c": C}
    xs = maps(dims)
    out = create_fusion("channel-exchange-p", dims=dims, p=0.25)(xs)
    a, b, c = xs["a"], xs["b"], xs["c"]
    expected_b = b.clone()
    expected_b[:, [0, 4]] = (a[:, [0, 4]] + c[:, [0, 4]]) / 2
    torch.testing.assert_close(out["b"], expected_b)


@pytest.mark.parametrize(
    ("name", "p", "message"),
    [
        ("spatial-exchange", True, r"SpatialExchange: p must be a fraction 1/k in \(0, 1\], got True"),
        ("channel-exchange-p", 1.5, r"ChannelExchangeP: p must be a fraction 1/k in \(0, 1\], got 1.5"),
        ("channel-exchange-p", "0.5", r"ChannelExchangeP: p must be a fraction 1/k in \(0, 1\], got '0.5'"),
        ("spatial-exchange", 0.4, r"SpatialExchange: p must be 1/k for an integer k .*got 0.4"),
    ],
)
def test_periodic_swaps_name_themselves_and_the_bad_fraction(name: str, p: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        create_fusion(name, dims=EQUAL, p=p)


@pytest.mark.parametrize("name", ["spatial-exchange", "channel-exchange-p"])
def test_periodic_swap_with_p_one_swaps_everything_and_keeps_its_option(name: str) -> None:
    xs = maps(EQUAL)
    op = create_fusion(name, dims=EQUAL, p=1)
    assert (op.p, op.period) == (1, 1)
    out = op(xs)
    assert torch.equal(out["rgb"], xs["depth"]) and torch.equal(out["depth"], xs["rgb"])
    assert create_fusion(name, dims=EQUAL, p=0.25).p == 0.25


def test_rectify_defaults_follow_cmx() -> None:
    assert fusion_info("rectify").options == {"reduction": 1, "lambda_c": 0.5, "lambda_s": 0.5}
    op = create_fusion("rectify", dims=EQUAL)  # reduction 1: hidden widths 2 M C (channel) and C (spatial)
    assert (op.channel_weights[0].in_features, op.channel_weights[0].out_features) == (2 * 2 * C, 2 * 2 * C)
    assert (op.spatial_weights[0].in_channels, op.spatial_weights[0].out_channels) == (2 * C, C)
    with pytest.raises(ValueError, match=r"^rectify: common width 8 is not divisible by reduction 3$"):
        create_fusion("rectify", dims=EQUAL, reduction=3)


def test_rectify_with_neutral_weights_adds_half_of_the_others() -> None:
    dims = {"a": C, "b": C, "c": C}
    op = create_fusion("rectify", dims=dims)
    with torch.no_grad():  # zero logits: every channel and spatial weight is sigmoid(0) = 0.5
        for layer in (op.channel_weights[-1], op.spatial_weights[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
    xs = maps(dims)
    out = op(xs)
    a, b, c = xs["a"], xs["b"], xs["c"]
    # x'_m = x_m + mean_{n != m} (0.5 * 0.5 + 0.5 * 0.5) x_n
    torch.testing.assert_close(out["a"], a + 0.5 * (b + c) / 2)
    torch.testing.assert_close(out["c"], c + 0.5 * (a + b) / 2)


def test_rectify_without_lambdas_is_the_identity() -> None:
    xs = maps(EQUAL)
    out = create_fusion("rectify", dims=EQUAL, lambda_c=0.0, lambda_s=0.0)(xs)
    assert all(torch.equal(out[m], xs[m]) for m in xs)


@pytest.mark.parametrize("logit", [1e4, -1e4])
def test_aff_with_saturated_attention_returns_one_input(logit: float) -> None:
    op = create_fusion("aff", dims=EQUAL)
    with torch.no_grad():
        op.attention.local_att[-1].bias.fill_(logit)  # the final norm's shift: sigmoid(M) = 1 or 0
    xs = maps(EQUAL)
    first, second = xs["depth"], xs["rgb"]  # sorted order: depth takes M, rgb takes 1 - M
    torch.testing.assert_close(op(xs), first if logit > 0 else second)


def test_aff_scale_restores_the_reference_factor_two() -> None:
    op = create_fusion("aff", dims=EQUAL, scale=2.0)
    with torch.no_grad():
        op.attention.local_att[-1].bias.fill_(1e4)
    xs = maps(EQUAL)
    torch.testing.assert_close(op(xs), 2 * xs["depth"])


def test_aff_of_three_modalities_can_select_any_one() -> None:
    dims = {"a": C, "b": C, "c": C}
    op = create_fusion("aff", dims=dims)
    xs = maps(dims)
    with torch.no_grad():
        op.attention.local_att[-1].bias[C:].fill_(1e4)  # logits (a, b, c) = (0, big, 0)
    torch.testing.assert_close(op(xs), xs["b"])


@pytest.mark.parametrize("name", ["aff", "iaff", "sk"])
def test_convex_merges_of_identical_inputs_return_the_input(name: str) -> None:
    dims = {"a": C, "b": C, "c": C}
    x = maps({"x": C})["x"]
    torch.testing.assert_close(build(name, dims)({m: x for m in dims}), x)


def test_iaff_has_a_second_separate_attention() -> None:
    op = create_fusion("iaff", dims=EQUAL)
    xs = maps(EQUAL)
    probe_loss(op(xs)).backward()  # the second iteration uses both branches of its own MS-CAM
    for branch in (op.attention2.local_att, op.attention2.global_att):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())
    first = {id(p) for p in op.attention1.parameters()}
    assert first.isdisjoint(id(p) for p in op.attention2.parameters())
    op.zero_grad()
    before = op(xs)
    with torch.no_grad():
        op.attention2.global_att[-1].bias.fill_(1e4)  # only the second global branch: weights -> first input
    after = op(xs)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, xs["depth"])


def test_mixing_interleaves_one_channel_of_each_modality_per_group() -> None:
    op = create_fusion("mixing", dims=EQUAL)
    conv, prelu = op.mix[0], op.mix[1]
    with torch.no_grad():  # each group (depth_c, rgb_c) keeps its first member, the depth channel
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[:, 0, 1, 1] = 1.0
    xs = maps(EQUAL)
    expected = F.instance_norm(F.prelu(xs["depth"], prelu.weight))
    torch.testing.assert_close(op(xs), expected)


def test_se_add_with_neutral_gates_is_half_the_sum() -> None:
    op = create_fusion("se-add", dims=EQUAL, reduction=4)
    with torch.no_grad():
        for se in op.se.values():
            se.fc[2].weight.zero_()
            se.fc[2].bias.zero_()
    xs = maps(EQUAL)
    torch.testing.assert_close(op(xs), 0.5 * (xs["rgb"] + xs["depth"]))


def test_eca_adaptive_kernel_size_follows_the_paper() -> None:
    assert [eca_kernel_size(c) for c in (16, 64, 128, 256, 512)] == [3, 3, 5, 5, 5]
    assert create_fusion("eca", dims={"a": 64, "b": 64}).kernel_size == 5
    assert create_fusion("eca", dims={"a": 64, "b": 64}, kernel_size=3).kernel_size == 3


def cmx_cross_path(op: nn.Module, x1: Tensor, x2: Tensor) -> Tensor:
    """CMX's FeatureFusionModule forward for two modalities, written as in its reference, on op's weights."""
    b, c, h, w = x1.shape
    heads = op.num_heads
    t1, t2 = x1.flatten(2).transpose(1, 2), x2.flatten(2).transpose(1, 2)
    y1, u1 = F.relu(op.channel_proj["a"](t1)).chunk(2, dim=-1)
    y2, u2 = F.relu(op.channel_proj["b"](t2)).chunk(2, dim=-1)
    inner = u1.shape[-1]
    q1 = u1.reshape(b, -1, heads, inner // heads).permute(0, 2, 1, 3)
    q2 = u2.reshape(b, -1, heads, inner // heads).permute(0, 2, 1, 3)
    k1, v1 = op.kv["a"](u1).reshape(b, -1, 2, heads, inner // heads).permute(2, 0, 3, 1, 4)
    k2, v2 = op.kv["b"](u2).reshape(b, -1, 2, heads, inner // heads).permute(2, 0, 3, 1, 4)
    scale = (inner // heads) ** -0.5
    ctx1 = ((k1.transpose(-2, -1) @ v1) * scale).softmax(dim=-2)
    ctx2 = ((k2.transpose(-2, -1) @ v2) * scale).softmax(dim=-2)
    a1 = (q1 @ ctx2).permute(0, 2, 1, 3).reshape(b, h * w, inner)
    a2 = (q2 @ ctx1).permute(0, 2, 1, 3).reshape(b, h * w, inner)
    o1 = op.token_norm["a"](t1 + op.end_proj["a"](torch.cat([y1, a1], dim=-1)))
    o2 = op.token_norm["b"](t2 + op.end_proj["b"](torch.cat([y2, a2], dim=-1)))
    merged = torch.cat([o1, o2], dim=-1).permute(0, 2, 1).reshape(b, 2 * c, h, w)
    return op.embed(merged)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_ffm_of_two_modalities_matches_the_cmx_computation(num_heads: int) -> None:
    dims = {"a": C, "b": C}
    op = create_fusion("ffm", dims=dims, num_heads=num_heads).eval()
    with torch.no_grad():  # CMX's initialisation makes the attention tiny; make it matter
        for layer in [*op.kv.values(), *op.channel_proj.values()]:
            layer.weight.normal_(0.0, 0.5)
    xs = maps(dims)
    torch.testing.assert_close(op(xs), cmx_cross_path(op, xs["a"], xs["b"]))
