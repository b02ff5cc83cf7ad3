"""Necks: aggregate the fused maps of one or several stages into one map for a dense or classification head.

Legend: b batch, c channels, h height, w width; stage maps are given finest (earliest) first.

- ``fpn``: ``P_top = L_top C_top``, ``P_k = L_k C_k + up(P_{k+1})``, output ``Conv3x3(P_0)`` at the finest
  scale (torchvision ``ops/feature_pyramid_network.py``: 1x1 laterals, nearest upsampling, 3x3 output conv;
  only the finest level is returned because the dense head needs one map).
- ``aspp``: DeepLabv3's atrous spatial pyramid pooling on the deepest map (``Conv1x1([1x1, 3x3 dilated r for r in
  rates, upsampled image pool])``, torchvision ``segmentation/deeplabv3.py``; its dropout 0.5 is left out).
- ``ppm``: PSPNet's pyramid pooling on the deepest map (``Conv3x3([x, up(Conv1x1(AdaptiveAvgPool_b x)) for b in
  bins])``, mmseg ``psp_head.py``).
With several stages, ASPP or PPM gives the top of the same top-down pathway as FPN (the UPerNet arrangement:
PPM on the deepest map, FPN for the rest), so every listed stage reaches the head.
- ``concat`` (``neck: null`` with several stages): every map upsampled to the finest scale, concatenated, Conv1x1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NECKS = ("fpn", "aspp", "ppm", "concat")


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, *, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _up(x: Tensor, like: Tensor, mode: str = "bilinear") -> Tensor:
    if x.shape[-2:] == like.shape[-2:]:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")
    return F.interpolate(x, size=like.shape[-2:], mode=mode, align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (B, C, h, w) -> (B, width, h, w)."""

    def __init__(self, in_channels: int, width: int, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        if not rates or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
            raise ValueError(f"model.rates must be a non-empty list of positive integers, got {list(rates)}")
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, width, 1)] + [conv_bn_relu(in_channels, width, 3, dilation=r) for r in rates]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, width, 1))
        self.project = conv_bn_relu((len(rates) + 2) * width, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        parts = [branch(x) for branch in self.branches]
        parts.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))  # image-level features, upsampled (a broadcast)
        return self.project(torch.cat(parts, dim=1))


class PPM(nn.Module):
    """Pyramid pooling module (B, C, h, w) -> (B, width, h, w)."""

    def __init__(self, in_channels: int, width: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        if not bins or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bins):
            raise ValueError(f"model.bins must be a non-empty list of positive integers, got {list(bins)}")
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_channels, width, 1)) for b in bins]
        )
        self.bottleneck = conv_bn_relu(in_channels + len(bins) * width, width, 3)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [_up(stage(x), x) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class TopDownNeck(nn.Module):
    """FPN's top-down pathway over the stage maps (finest first), with the top level given by ``context``
    (a 1x1 lateral for ``fpn``, ASPP or PPM otherwise); the output is the finest level after a 3x3 conv."""

    def __init__(self, in_channels: Sequence[int], width: int, context: nn.Module) -> None:
        super().__init__()
        self.context = context
        self.laterals = nn.ModuleList([nn.Conv2d(c, width, 1) for c in in_channels[:-1]])
        self.output = conv_bn_relu(width, width, 3)
        self.out_dim = width

    def forward(self, maps: Tensor | Sequence[Tensor]) -> Tensor:
        maps = [maps] if isinstance(maps, Tensor) else list(maps)
        top = self.context(maps[-1])
        for lateral, x in zip(reversed(self.laterals), reversed(maps[:-1])):
            top = lateral(x) + _up(top, x, "nearest")
        return self.output(top)


class ConcatNeck(nn.Module):
    """Every stage map upsampled to the finest scale, concatenated, then Conv1x1-BN-ReLU to ``width``."""

    def __init__(self, in_channels: Sequence[int], width: int) -> None:
        super().__init__()
        self.project = conv_bn_relu(sum(in_channels), width, 1)
        self.out_dim = width

    def forward(self, maps: Tensor | Sequence[Tensor]) -> Tensor:
        maps = [maps] if isinstance(maps, Tensor) else list(maps)
        return self.project(torch.cat([_up(x, maps[0]) for x in maps], dim=1))


def make_neck(
    name: str, in_channels: Sequence[int], width: int, *, rates: Sequence[int] = (6, 12, 18),
    bins: Sequence[int] = (1, 2, 3, 6),
) -> nn.Module:
    """A neck over stage maps of ``in_channels`` (finest first) with output width ``width`` (``out_dim``)."""
    if name not in NECKS:
        raise ValueError(f"model.neck must be one of {', '.join(NECKS)} or null, got {name!r}")
    if name == "concat":
        return ConcatNeck(in_channels, width)
    deepest = in_channels[-1]
    if name == "fpn":
        context: nn.Module = nn.Conv2d(deepest, width, 1)
    elif name == "aspp":
        context = ASPP(deepest, width, rates)
    else:
        context = PPM(deepest, width, bins)
    return TopDownNeck(in_channels, width, context)


__all__ = ["ASPP", "NECKS", "PPM", "ConcatNeck", "TopDownNeck", "make_neck"]
