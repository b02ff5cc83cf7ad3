"""Options of the gated and attentional map merges of ``fuselab.fusion.maps``, checked with their exact
messages and defaults: each operator names itself, the paper's defaults are the ones built, and the
selective kernel's bottleneck width is the paper's ``max(C // r, min_width)``."""

from __future__ import annotations

import re

import pytest
from torch import nn

from fuselab import create_fusion, fusion_info

EQUAL = {"a": 8, "b": 8}


def _raises(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("se-add", {"reduction": 3}, "se-add: common width 8 is not divisible by reduction 3"),
        ("cbam", {"reduction": 3}, "cbam: summed width 16 is not divisible by reduction 3"),
        ("cbam", {"reduction": 2, "kernel_size": 4}, "cbam: kernel_size must be a positive odd integer, got 4"),
        ("eca", {"kernel_size": 4}, "eca: kernel_size must be a positive odd integer, got 4"),
        ("sk", {"reduction": 0}, "sk: reduction must be a positive integer, got 0"),
        ("sk", {"reduction": True}, "sk: reduction must be a positive integer, got True"),
        ("sk", {"reduction": 2.0}, "sk: reduction must be a positive integer, got 2.0"),
        ("sk", {"norm": "layer"}, "sk: norm must be one of 'batch', 'group' or an nn.Module class, got 'layer'"),
    ],
)
def test_map_merges_name_themselves_and_the_bad_option(name, options, message):
    with _raises(message):
        create_fusion(name, dims=EQUAL, **options)


def test_defaults_follow_the_papers():
    assert fusion_info("cbam").options == {"reduction": 16, "kernel_size": 7}
    assert fusion_info("sk").options["reduction"] == 16 and fusion_info("sk").options["min_width"] == 32


def test_selective_kernel_bottleneck_is_max_of_width_over_r_and_min_width():
    sk = create_fusion("sk", dims={"a": 40, "b": 40}, reduction=16, min_width=1)
    assert sk.reduce[0].out_channels == 40 // 16  # 2, a whole number of channels
    assert sk.reduce[0].bias is None and sk.select.bias is None  # followed by a norm / a softmax over modalities
    assert sk.select.out_channels == 2 * 40
    assert create_fusion("sk", dims={"a": 8, "b": 8}).reduce[0].out_channels == 32  # min_width wins
    assert create_fusion("sk", dims={"a": 8, "b": 8}, reduction=1, min_width=4).reduce[0].out_channels == 8


def test_eca_convolution_keeps_the_channel_count_for_any_kernel():
    eca = create_fusion("eca", dims=EQUAL, kernel_size=5)
    assert eca.conv.padding == (2,) and eca.conv.bias is None
    assert isinstance(eca.conv, nn.Conv1d)
