"""The difference merges of ``fuselab.fusion.difference`` beyond two modalities and default options: pair
means over 3 and 4 maps, concat-diff with the product and a 3x3 kernel, TFI with three modalities and
one-group norms, and the option checks with their exact messages. Hand computations use only the operator's
weight tensors and elementary functions.

Legend: b batch, c channels, h height, w width of a map.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fuselab import create_fusion, fusion_info
from fuselab.fusion.difference import (
    MAP_NORMS,
    OneGroupNorm,
    check_batch_statistics,
    check_odd_kernel,
    is_batch_norm,
    mean_abs_difference,
    mean_product,
    pad_channels,
    resolve_norm,
)

B, C, H, W = 2, 4, 5, 6


def _maps(dims: dict[str, int], seed: int = 3) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, d, H, W, generator=g, dtype=torch.float64) for m, d in dims.items()}


def _randomise(op: nn.Module, seed: int = 1) -> nn.Module:
    op = op.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for module in op.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.3 * torch.randn(module.num_features, generator=g, dtype=torch.float64))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=g, dtype=torch.float64))
    return op


def _raises(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


def _group_norm(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """One group: statistics over channels and positions of each sample."""
    mean = x.mean((1, 2, 3), keepdim=True)
    var = x.var((1, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


def _cnr(x: Tensor, seq: nn.Sequential) -> Tensor:
    """conv (no bias, 'same' padding) -> one-group norm -> ReLU, by hand."""
    conv = seq[0]
    assert conv.bias is None
    y = F.conv2d(x, conv.weight, padding=conv.weight.shape[-1] // 2)
    return torch.relu(_group_norm(y, seq[1]))


# -- pair means and padding --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_pair_means_over_every_pair(n):
    xs = list(_maps({f"m{i}": C for i in range(n)}).values())
    pairs = list(itertools.combinations(range(n), 2))
    assert len(pairs) == n * (n - 1) // 2
    expected_abs = sum((xs[i] - xs[j]).abs() for i, j in pairs) / len(pairs)
    expected_prod = sum(xs[i] * xs[j] for i, j in pairs) / len(pairs)
    torch.testing.assert_close(mean_abs_difference(xs), expected_abs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean_product(xs), expected_prod, rtol=1e-12, atol=1e-12)


def test_pad_channels_appends_zero_channels_and_leaves_a_wide_map_alone():
    x = _maps({"x": 3})["x"]
    padded = pad_channels(x, 5)
    assert padded.shape == (B, 5, H, W)
    assert torch.equal(padded[:, :3], x) and torch.equal(padded[:, 3:], torch.zeros(B, 2, H, W, dtype=x.dtype))
    assert pad_channels(x, 3) is x


# -- option checks -----------------------------------------------------------------------------------------


def test_kernel_sizes_are_positive_and_odd():
    assert check_odd_kernel(1, "X") == 1 and check_odd_kernel(5, "X") == 5
    for bad in (True, 0, -1, 2, 3.0, "3"):
        with _raises(f"X: kernel_size must be a positive odd integer, got {bad!r}"):
            check_odd_kernel(bad, "X")
    with _raises("concat-diff: kernel_size must be a positive odd integer, got 2"):
        create_fusion("concat-diff", dims={"a": C, "b": C}, kernel_size=2)
    with _raises("tfi: kernel_size must be a positive odd integer, got 4"):
        create_fusion("tfi", dims={"a": C, "b": C}, kernel_size=4)


def test_norms_by_name_or_class():
    assert MAP_NORMS == {"batch": nn.BatchNorm2d, "group": OneGroupNorm}
    assert resolve_norm("batch", "X") is nn.BatchNorm2d and resolve_norm("group", "X") is OneGroupNorm
    assert resolve_norm(nn.InstanceNorm2d, "X") is nn.InstanceNorm2d
    for bad in ("layer", int, None):
        with _raises(f"X: norm must be one of 'batch', 'group' or an nn.Module class, got {bad!r}"):
            resolve_norm(bad, "X")
    with _raises("tfi: norm must be one of 'batch', 'group' or an nn.Module class, got 'instance'"):
        create_fusion("tfi", dims={"a": C, "b": C}, norm="instance")
    norm = OneGroupNorm(6)
    assert (norm.num_groups, norm.num_channels) == (1, 6)
    assert is_batch_norm(nn.BatchNorm2d) and is_batch_norm(nn.SyncBatchNorm)
    assert not is_batch_norm(OneGroupNorm) and not is_batch_norm(nn.InstanceNorm2d)


def test_batch_statistics_need_more_than_one_value_per_channel():
    module = nn.BatchNorm2d(C).train()
    single = "X: batch norm in training mode needs more than one value per channel, and {} gives one; " \
             "use norm='group' (or a larger batch; train.last_batch=merge when a training split leaves one sample over)"
    with _raises(single.format("a single 1x1 map")):
        check_batch_statistics(module, torch.zeros(1, C, 1, 1), "X", batch_norm=True)
    with _raises(single.format("a batch of 1")):
        check_batch_statistics(module, torch.zeros(1, C, 5, 5), "X", batch_norm=True, pooled=True)
    for shape, pooled in (((1, C, 2, 1), False), ((1, C, 1, 2), False), ((2, C, 1, 1), False), ((2, C, 5, 5), True)):
        check_batch_statistics(module, torch.zeros(shape), "X", batch_norm=True, pooled=pooled)  # more than one
    check_batch_statistics(module, torch.zeros(1, C, 1, 1), "X", batch_norm=False)  # a group norm is fine
    check_batch_statistics(module.eval(), torch.zeros(1, C, 1, 1), "X", batch_norm=True)  # running statistics
    op = create_fusion("tfi", dims={"a": C, "b": C}).train()
    with _raises(single.format("a single 1x1 map").replace("X:", "tfi:")):
        op({"a": torch.zeros(1, C, 1, 1), "b": torch.zeros(1, C, 1, 1)})
    grouped = create_fusion("tfi", dims={"a": C, "b": C}, norm="group").train()
    assert grouped({"a": torch.randn(1, C, 1, 1), "b": torch.randn(1, C, 1, 1)}).shape == (1, C, 1, 1)


def test_siamese_options_name_the_operator():
    with _raises("abs-diff: projection must be 'shared' or 'independent', got 'own'"):
        create_fusion("abs-diff", dims={"a": C, "b": C}, projection="own")
    with _raises("diff: projection must be 'shared' or 'independent', got 'siamese'"):
        create_fusion("diff", dims={"a": C, "b": C}, projection="siamese")
    assert fusion_info("diff").options == {"order": None, "projection": "shared"}
    assert fusion_info("abs-diff").options == {"projection": "shared"}
    assert fusion_info("concat-diff").options == {"product": False, "kernel_size": 1}
    assert fusion_info("tfi").options == {"kernel_size": 3, "norm": "batch"}
    op = create_fusion("abs-diff", dims={"a": 3, "b": 5})
    assert (op.width, op.out_dim, op.projection) == (5, 5, "shared") and isinstance(op.proj, nn.Identity)
    own = create_fusion("abs-diff", dims={"a": 3, "b": 5}, out_dim=4, projection="independent")
    assert {m: (p.in_features, p.out_features) for m, p in own.proj.items()} == {"a": (3, 4), "b": (5, 4)}


# -- hand computations with three modalities ---------------------------------------------------------------


def test_diff_of_three_with_an_order_and_a_projection():
    dims = {"a": C, "b": 3, "c": C}
    op = _randomise(create_fusion("diff", dims=dims, out_dim=5, order=["c", "a", "b"])).eval()
    xs = _maps(dims)
    proj = {m: torch.einsum("oc,bchw->bohw", op.proj.weight, pad_channels(x, C)) + op.proj.bias.view(1, -1, 1, 1)
            for m, x in xs.items()}
    expected = ((proj["b"] - proj["c"]) + (proj["b"] - proj["a"])) / 2  # the last of the order minus each other
    torch.testing.assert_close(op(xs), expected, rtol=1e-12, atol=1e-12)


def test_independent_projections_of_abs_diff_by_hand():
    dims = {"a": 3, "b": 5}
    op = _randomise(create_fusion("abs-diff", dims=dims, out_dim=4, projection="independent")).eval()
    xs = _maps(dims)
    p = {m: torch.einsum("oc,bchw->bohw", op.proj[m].weight, x) + op.proj[m].bias.view(1, -1, 1, 1)
         for m, x in xs.items()}
    torch.testing.assert_close(op(xs), (p["a"] - p["b"]).abs(), rtol=1e-12, atol=1e-12)


def test_concat_diff_of_three_with_the_product_and_a_3x3_kernel():
    dims = {"a": C, "b": 2, "c": C}
    op = _randomise(create_fusion("concat-diff", dims=dims, out_dim=3, product=True, kernel_size=3)).eval()
    assert op.conv.weight.shape == (3, 5 * C, 3, 3) and op.conv.padding == (1, 1)
    xs = _maps(dims)
    common = [pad_channels(xs[m], C) for m in ("a", "b", "c")]
    pairs = list(itertools.combinations(common, 2))
    absdiff = sum((x - y).abs() for x, y in pairs) / 3
    prod = sum(x * y for x, y in pairs) / 3
    expected = F.conv2d(torch.cat([*common, absdiff, prod], dim=1), op.conv.weight, op.conv.bias, padding=1)
    torch.testing.assert_close(op(xs), expected, rtol=1e-12, atol=1e-12)
    plain = create_fusion("concat-diff", dims=dims)
    assert plain.conv.weight.shape == (C, 4 * C, 1, 1) and not plain.product


def test_tfi_of_three_modalities_with_one_group_norms():
    dims = {"a": C, "b": C, "c": 3}
    op = _randomise(create_fusion("tfi", dims=dims, out_dim=6, norm="group", kernel_size=3)).train()
    assert not op.batch_norm and all(isinstance(m, OneGroupNorm) for m in op.modules() if isinstance(m, nn.GroupNorm))
    assert op.conv_cat[0].weight.shape == (C, 3 * C, 3, 3) and op.conv_out[0].weight.shape == (6, C, 1, 1)
    xs = _maps(dims)
    common = [pad_channels(xs[m], C) for m in ("a", "b", "c")]
    d = _cnr(mean_abs_difference(common), op.conv_diff)
    enhanced = [_cnr(x * d + x, op.enhance[m]) for m, x in zip(("a", "b", "c"), common)]
    fused = _cnr(torch.cat(enhanced, dim=1), op.conv_cat)
    torch.testing.assert_close(op(xs), _cnr(d + fused, op.conv_out), rtol=1e-10, atol=1e-10)
    assert create_fusion("tfi", dims=dims).batch_norm


@pytest.mark.parametrize(("name", "cls"), [("diff", "Diff"), ("abs-diff", "AbsDiff"), ("concat-diff", "ConcatDiff"),
                                           ("tfi", "TemporalFeatureInteraction")])
def test_out_dim_is_checked_by_every_difference_merge(name, cls):
    for bad in (0, -2, True):
        with _raises(f"{cls}: out_dim must be a positive integer or None, got {bad!r}"):
            create_fusion(name, dims={"a": C, "b": C}, out_dim=bad)


def test_the_order_of_diff_is_checked_with_its_name():
    with _raises("diff: order ['a', 'a'] must list each modality exactly once; modalities are ['a', 'b']"):
        create_fusion("diff", dims={"a": C, "b": C}, order=["a", "a"])


@pytest.mark.parametrize("name", ["concat-diff", "tfi"])
def test_a_5x5_kernel_keeps_the_map_size(name):
    op = create_fusion(name, dims={"a": C, "b": C}, kernel_size=5).double().eval()
    convs = [m for m in op.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (5, 5)]
    assert convs and all(m.padding == (2, 2) for m in convs)
    assert op(_maps({"a": C, "b": C}, seed=4)).shape == (B, C, H, W)
