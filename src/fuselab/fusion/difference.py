"""Difference merges for feature maps: diff, abs-diff, concat-diff and TFI-GR's temporal feature interaction.

Legend: b batch, m modality, c channels, h height, w width of a map.

Change-detection necks compare two co-registered maps. For more than two modalities every operator here
uses the mean over all pairs (``|x_i - x_j|`` for i < j), so no modality is privileged; only ``diff``,
whose sign needs an order, takes an ``order`` option.

Widths: ``diff`` and ``abs-diff`` are Siamese: every input goes through the same map, so equal inputs give
exactly 0, ``diff`` is antisymmetric and ``abs-diff`` symmetric at any width and any ``out_dim``. An input
narrower than the widest one is zero-padded (channel k meets channel k, as CEN's exchange at unequal
widths), and ``out_dim`` is reached by one shared 1x1 projection. ``concat-diff`` and ``tfi`` zero-pad the
same way, so their ``|x_i - x_j|`` is also 0 for equal inputs; their own convolutions give ``out_dim``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fuselab.fusion.base import ChannelLinear, Merge, resolve_order
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


class OneGroupNorm(nn.GroupNorm):
    """GroupNorm with a single group: statistics over the channels and positions of each sample, so it works
    at any batch size (also on a pooled (B, C, 1, 1) map at batch size 1)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(1, num_channels)


MAP_NORMS: dict[str, type[nn.Module]] = {"batch": nn.BatchNorm2d, "group": OneGroupNorm}


def resolve_norm(norm: str | type[nn.Module], where: str) -> type[nn.Module]:
    """The norm layer class of a map operator: a name in ``MAP_NORMS`` (what a config can give) or a class."""
    if isinstance(norm, type) and issubclass(norm, nn.Module):
        return norm
    if isinstance(norm, str) and norm in MAP_NORMS:
        return MAP_NORMS[norm]
    names = ", ".join(map(repr, MAP_NORMS))
    raise ValueError(f"{where}: norm must be one of {names} or an nn.Module class, got {norm!r}")


def is_batch_norm(norm: type[nn.Module]) -> bool:
    """Does this norm class take statistics over the batch (and so need more than one value per channel)?"""
    return issubclass(norm, nn.modules.batchnorm._BatchNorm)


def check_batch_statistics(
    module: nn.Module, x: Tensor, where: str, *, batch_norm: bool, pooled: bool = False
) -> None:
    """In training mode a batch norm needs more than one value per channel: a ValueError naming the fix
    instead of PyTorch's error. ``pooled``: the norm sees the map after global pooling, (B, C, 1, 1)."""
    values = x.shape[0] if pooled else x.shape[0] * x.shape[-2] * x.shape[-1]
    if batch_norm and module.training and values == 1:
        what = "a batch of 1" if pooled else "a single 1x1 map"
        raise ValueError(
            f"{where}: batch norm in training mode needs more than one value per channel, and {what} gives one; "
            "use norm='group' (or a larger batch; train.last_batch=merge when a training split leaves one sample over)"
        )


def pad_channels(x: Tensor, width: int) -> Tensor:
    """A map (B, C, H, W) zero-padded on the channel axis to (B, width, H, W), width >= C."""
    return F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1])) if x.shape[1] < width else x


class _Siamese(Merge):
    """A difference merge whose inputs all go through one map: zero-padding to the widest input width, then
    (where ``out_dim`` differs from that width) one shared 1x1 projection. ``projection="independent"``
    keeps a separate projection per input instead (not a Siamese difference: equal inputs do not give 0)."""

    forms = ("map",)
    natural_out_dim = "the largest input width"
    projections = ("shared", "independent")
    registry_name = ""  # the id in error messages

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None, *, projection: str = "shared") -> None:
        super().__init__(dims, out_dim)
        where = self.registry_name
        if projection not in self.projections:
            raise ValueError(f"{where}: projection must be 'shared' or 'independent', got {projection!r}")
        self.projection = projection
        self.width = max(self.dims.values())
        self.out_dim = out_dim or self.width
        if projection == "shared":
            self.proj = ChannelLinear(self.width, self.out_dim) if self.out_dim != self.width else nn.Identity()
        else:
            self.proj = project_to_common(self.dims, self.out_dim)

    def project(self, m: str, x: Tensor) -> Tensor:
        """Modality ``m``'s map (B, C_m, H, W) at the output width (B, out, H, W)."""
        if self.projection == "shared":
            return self.proj(pad_channels(x, self.width))  # one call per input: equal inputs, equal bits
        return self.proj[m](x)


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
    """A map merge whose modalities are first zero-padded to a common width ``self.width`` (the largest)."""

    forms = ("map",)
    natural_out_dim = "the largest input width"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        self.width = max(self.dims.values())
        self.out_dim = out_dim or self.width

    def common(self, xs: Mapping[str, Tensor]) -> list[Tensor]:
        """M maps (B, width, H, W), modalities in sorted order."""
        return [pad_channels(xs[m], self.width) for m in self.modalities]


@FUSIONS.register("diff")
class Diff(_Siamese):
    """Signed difference ``b - a`` of two maps (the later modality of ``order`` minus the earlier one).

    Paper: the 'diff' policy of Siamese change-detection necks. Reference: open-cd
    ``models/necks/feature_fusion.py`` (``x2 - x1``). Rule for M modalities: the mean over the other
    modalities of (last modality of ``order`` minus that modality), i.e. the last minus the mean of the
    others. Widths: Siamese (see the module docstring): inputs are zero-padded to the widest input and
    ``out_dim`` is reached by one shared 1x1 projection P, whose bias cancels, so ``z = P(b) - P(a)`` is 0
    for equal inputs and changes sign when the inputs are swapped. ``projection="independent"`` gives each
    input its own projection P_m instead; that is not a Siamese difference (equal inputs do not give 0).
    """

    asymmetric = True
    registry_name = "diff"
    multimodal_rule = "the last modality of `order` minus the mean of the others (b - a for two, sorted order)"
    paper = "feature difference of Siamese change-detection networks (open-cd 'diff' policy)"
    reference = "open-cd models/necks/feature_fusion.py (policy 'diff': x2 - x1)"
    formula = "z = mean_{m != last} (P x_last - P x_m), P shared (zero-pad, then 1x1 conv to out_dim if needed)"

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int | None = None,
        *,
        order: Sequence[str] | None = None,
        projection: str = "shared",
    ) -> None:
        super().__init__(dims, out_dim, projection=projection)
        self.order = resolve_order(list(self.dims), order, "diff")

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        *others, last = (self.project(m, xs[m]) for m in self.order)
        return torch.stack([last - x for x in others], dim=0).mean(0)  # exactly 0 where the inputs are equal


@FUSIONS.register("abs-diff")
class AbsDiff(_Siamese):
    """Absolute difference ``|a - b|``; for M modalities the mean of ``|x_i - x_j|`` over all pairs.

    Paper: Daudt et al., "Fully Convolutional Siamese Networks for Change Detection", ICIP 2018 (FC-Siam-diff
    skip connections); the 'abs_diff' policy of Siamese change-detection necks. Reference: open-cd
    ``models/necks/feature_fusion.py`` (policy 'abs_diff'). Widths: Siamese (see the module docstring):
    inputs are zero-padded to the widest input and ``out_dim`` is reached by one shared 1x1 projection P,
    so ``z = |P(a) - P(b)|`` is 0 for equal inputs and symmetric in its inputs. ``projection="independent"``
    gives each input its own projection P_m instead; that is not a Siamese difference (equal inputs do not
    give 0, and swapping the inputs changes the result).
    """

    registry_name = "abs-diff"
    multimodal_rule = "mean over all pairs i < j of |x_i - x_j|"
    paper = "Daudt et al., Fully Convolutional Siamese Networks for Change Detection (FC-Siam-diff), ICIP 2018"
    reference = "open-cd models/necks/feature_fusion.py (policy 'abs_diff': |x1 - x2|)"
    formula = "z = mean_{i<j} |P x_i - P x_j|, P shared (zero-pad, then 1x1 conv to out_dim if needed)"

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        return mean_abs_difference([self.project(m, xs[m]) for m in self.modalities])


@FUSIONS.register("concat-diff")
class ConcatDiff(_CommonWidth):
    """Siamese comparison features ``[a, b, |a - b|]`` (``product=True`` adds ``a * b``), then a convolution.

    Paper: Conneau et al., "Supervised Learning of Universal Sentence Representations from Natural Language
    Inference Data", EMNLP 2017 (features ``[u, v, |u - v|, u * v]``); the same head as Sentence-BERT's
    classification objective (``[u, v, |u - v|]``). Reference: facebookresearch/InferSent ``models.py``
    (NLINet). Applied here to maps with a ``kernel_size`` convolution (default 1x1). Rule for M modalities:
    all modalities, then the mean over pairs of ``|x_i - x_j|`` (and of ``x_i * x_j``). Inputs narrower
    than the widest one are zero-padded to its width.
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
    output width defaults to the common input width (the reference always reduces to 64). ``norm`` is
    ``"batch"`` (the reference's BatchNorm2d), ``"group"`` (GroupNorm with one group, for a single 1x1 map in
    training) or a norm class.
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
        norm: str | type[nn.Module] = "batch",
    ) -> None:
        super().__init__(dims, out_dim)
        kernel_size = check_odd_kernel(kernel_size, "tfi")
        norm = resolve_norm(norm, "tfi")
        self.batch_norm = is_batch_norm(norm)
        width = self.width
        self.conv_diff = conv_norm_relu(width, width, kernel_size=kernel_size, norm=norm)
        self.enhance = nn.ModuleDict(
            {m: conv_norm_relu(width, width, kernel_size=kernel_size, norm=norm) for m in self.modalities}
        )
        self.conv_cat = conv_norm_relu(len(self.dims) * width, width, kernel_size=kernel_size, norm=norm)
        self.conv_out = conv_norm_relu(width, self.out_dim, kernel_size=1, norm=norm)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        common = self.common(xs)  # M x (B, C, H, W)
        check_batch_statistics(self, common[0], "tfi", batch_norm=self.batch_norm)
        d = self.conv_diff(mean_abs_difference(common))  # (B, C, H, W)
        enhanced = [self.enhance[m](x * d + x) for m, x in zip(self.modalities, common)]
        fused = self.conv_cat(torch.cat(enhanced, dim=1))  # (B, M C, H, W) -> (B, C, H, W)
        return self.conv_out(d + fused)  # (B, out, H, W)
