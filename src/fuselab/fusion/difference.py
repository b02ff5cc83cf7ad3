"""Difference merges for feature maps: diff, abs-diff, concat-diff and TFI-GR's temporal feature interaction.

Legend: b batch, m modality, c channels, h height, w width of a map.

Change-detection necks compare two co-registered maps. For more than two modalities every operator here
uses the mean over all pairs (``|x_i - x_j|`` for i < j), so no modality is privileged; only ``diff``,
whose sign needs an order, takes an ``order`` option. Inputs of different widths are first projected to a
common width by a 1x1 convolution (``ChannelLinear``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fuselab.fusion.base import Merge, resolve_order
from fuselab.fusion.basic import project_to_common
from fuselab.registry import FUSIONS


def mean_abs_difference(xs: Sequence[Tensor]) -> Tensor:
    """Mean over all pairs i < j of ``|x_i - x_j|`` of M >= 2 maps (B, C, H, W); ``|a - b|`` for two."""
    pairs = list(itertools.combinations(xs, 2))
    return sum((a - b).abs() for a, b in pairs) / len(pairs)


def mean_product(xs: Sequence[Tensor]) -> Tensor:
    """Mean over all pairs i < j of ``x_i * x_j`` of M >= 2 maps (B, C, H, W); ``a * b`` for two."""
    pairs = list(itertools.combinations(xs, 2))
    return sum(a * b for a, b in pairs) / len(pairs)


def check_odd_kernel(kernel_size: int, where: str) -> int:
    """A positive odd kernel size (so that 'same' padding keeps the map size)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{where}: kernel_size must be a positive odd integer, got {kernel_size!r}")
    return kernel_size


def conv_norm_relu(
    in_channels: int, out_channels: int, *, kernel_size: int, norm: type[nn.Module]
) -> nn.Sequential:
    """Conv (no bias: the norm that follows cancels it) -> norm -> ReLU, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        norm(out_channels),
        nn.ReLU(inplace=True),
    )


class _CommonWidth(Merge):
    """A map merge whose modalities are first projected to a common width ``self.width``."""

    forms = ("map",)
    natural_out_dim = "the largest input width"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        self.width = max(self.dims.values())
        self.proj = project_to_common(self.dims, self.width)
        self.out_dim = out_dim or self.width

    def common(self, xs: Mapping[str, Tensor]) -> list[Tensor]:
        """M maps (B, width, H, W), in the order of ``xs``."""
        return [self.proj[m](x) for m, x in xs.items()]


@FUSIONS.register("diff")
class Diff(Merge):
    """Signed difference ``b - a`` of two maps (the later modality of ``order`` minus the earlier one).

    Paper: the 'diff' policy of Siamese change-detection necks. Reference: open-cd
    ``models/necks/feature_fusion.py`` (``x2 - x1``). Rule for M modalities: the last modality of ``order``
    minus the mean of the others. Each input is projected to the output width (default: the largest input
    width) where its width differs.
    """

    forms = ("map",)
    asymmetric = True
    multimodal_rule = "the last modality of `order` minus the mean of the others (b - a for two, sorted order)"
    natural_out_dim = "the largest input width"
    paper = "feature difference of Siamese change-detection networks (open-cd 'diff' policy)"
    reference = "open-cd models/necks/feature_fusion.py (policy 'diff': x2 - x1)"
    formula = "z = P_last x_last - mean_{m != last} P_m x_m"

    def __init__(
        self, dims: Mapping[str, int], out_dim: int | None = None, *, order: Sequence[str] | None = None
    ) -> None:
        super().__init__(dims, out_dim)
        self.order = resolve_order(list(self.dims), order, "diff")
        self.out_dim = out_dim or max(self.dims.values())
        self.proj = project_to_common(self.dims, self.out_dim)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        *others, last = (self.proj[m](xs[m]) for m in self.order)
        return last - torch.stack(others, dim=0).mean(0)


@FUSIONS.register("abs-diff")
class AbsDiff(Merge):
    """Absolute difference ``|a - b|``; for M modalities the mean of ``|x_i - x_j|`` over all pairs.

    Paper: Daudt et al., "Fully Convolutional Siamese Networks for Change Detection", ICIP 2018 (FC-Siam-diff
    skip connections); the 'abs_diff' policy of Siamese change-detection necks. Reference: open-cd ``models/necks/feature_fusion.py`` (policy 'abs_diff'). Each input is projected to
    the output width (default: the largest input width) where its width differs.
    """

    forms = ("map",)
    multimodal_rule = "mean over all pairs i < j of |x_i - x_j|"
    natural_out_dim = "the largest input width"
    paper = "Daudt et al., Fully Convolutional Siamese Networks for Change Detection (FC-Siam-diff), ICIP 2018"
    reference = "open-cd models/necks/feature_fusion.py (policy 'abs_diff': |x1 - x2|)"
    formula = "z = mean_{i<j} |P_i x_i - P_j x_j|"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        self.out_dim = out_dim or max(self.dims.values())
        self.proj = project_to_common(self.dims, self.out_dim)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        return mean_abs_difference([self.proj[m](x) for m, x in xs.items()])


@FUSIONS.register("concat-diff")
class ConcatDiff(_CommonWidth):
    """Siamese comparison features ``[a, b, |a - b|]`` (``product=True`` adds ``a * b``), then a convolution.

    Paper: Conneau et al., "Supervised Learning of Universal Sentence Representations from Natural Language
    Inference Data", EMNLP 2017 (features ``[u, v, |u - v|, u * v]``); the same head as Sentence-BERT's
    classification objective (``[u, v, |u - v|]``). Reference: facebookresearch/InferSent ``models.py``
    (NLINet). Applied here to maps with a ``kernel_size`` convolution (default 1x1). Rule for M modalities:
    all modalities, then the mean over pairs of ``|x_i - x_j|`` (and of ``x_i * x_j``).
    """

    multimodal_rule = "[x_1..x_M, mean_{i<j} |x_i - x_j| (, mean_{i<j} x_i * x_j)], then a convolution"
    paper = "Conneau et al., Supervised Learning of Universal Sentence Representations (InferSent), EMNLP 2017"
    reference = "facebookresearch/InferSent models.py (NLINet features); sentence-transformers SoftmaxLoss"
    formula = "z = Conv([x_1, ..., x_M, mean_{i<j} |x_i - x_j| (, mean_{i<j} x_i * x_j)])"

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int | None = None,
        *,
        product: bool = False,
        kernel_size: int = 1,
    ) -> None:
        super().__init__(dims, out_dim)
        kernel_size = check_odd_kernel(kernel_size, "concat-diff")
        self.product = bool(product)
        n_parts = len(self.dims) + 1 + int(self.product)
        self.conv = nn.Conv2d(n_parts * self.width, self.out_dim, kernel_size, padding=kernel_size // 2)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        common = self.common(xs)  # M x (B, C, H, W)
        parts = [*common, mean_abs_difference(common)]
        if self.product:
            parts.append(mean_product(common))
        return self.conv(torch.cat(parts, dim=1))  # (B, (M + 1 (+ 1)) C, H, W) -> (B, out, H, W)


@FUSIONS.register("tfi")
class TemporalFeatureInteraction(_CommonWidth):
    """TFI-GR's temporal feature interaction module: difference-enhanced features, fused and added to the
    difference.

    Paper: Li et al., "Remote Sensing Change Detection via Temporal Feature Interaction and Guided
    Refinement", IEEE TGRS 2022. Reference: guanyuezhen/TFI-GR ``models/model.py``
    (TemporalFeatureInteractionModule). Rule for M modalities: the difference is the mean over pairs of
    ``|x_i - x_j|``, each modality has its own enhancement convolution, and the fusion convolution takes all
    M enhanced maps. Differences: convolutions followed by a norm have no bias (the norm cancels it); the
    output width defaults to the common input width (the reference always reduces to 64).
    """

    multimodal_rule = (
        "d = Conv(mean_{i<j} |x_i - x_j|); each x_m enhanced by its own Conv(x_m * d + x_m); Conv over all M"
    )
    paper = (
        "Li et al., Remote Sensing Change Detection via Temporal Feature Interaction and Guided Refinement, "
        "TGRS 2022"
    )
    reference = "guanyuezhen/TFI-GR models/model.py (TemporalFeatureInteractionModule)"
    formula = "d = CBR|a-b|, a' = CBR(a*d + a), b' = CBR(b*d + b), z = CBR_1x1(d + CBR([a', b']))"

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int | None = None,
        *,
        kernel_size: int = 3,
        norm: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__(dims, out_dim)
        kernel_size = check_odd_kernel(kernel_size, "tfi")
        width = self.width
        self.conv_diff = conv_norm_relu(width, width, kernel_size=kernel_size, norm=norm)
        self.enhance = nn.ModuleDict(
            {m: conv_norm_relu(width, width, kernel_size=kernel_size, norm=norm) for m in self.modalities}
        )
        self.conv_cat = conv_norm_relu(len(self.dims) * width, width, kernel_size=kernel_size, norm=norm)
        self.conv_out = conv_norm_relu(width, self.out_dim, kernel_size=1, norm=norm)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        common = self.common(xs)  # M x (B, C, H, W)
        d = self.conv_diff(mean_abs_difference(common))  # (B, C, H, W)
        enhanced = [self.enhance[m](x * d + x) for m, x in zip(xs, common)]
        fused = self.conv_cat(torch.cat(enhanced, dim=1))  # (B, M C, H, W) -> (B, C, H, W)
        return self.conv_out(d + fused)  # (B, out, H, W)
