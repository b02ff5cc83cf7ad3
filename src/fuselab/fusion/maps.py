"""Attention-style merges of feature maps: se-add, acm, cbam, eca, aff, iaff, sk, ffm and mixing.

Legend: b batch, m modality, c channels, h height, w width of a map, n = h w tokens, e per-head width.

Every operator takes maps ``(B, C_m, H, W)`` that share their spatial size. Where an operator needs one
width for all modalities, inputs of another width are first projected to the common width (the largest
input width, or ``out_dim`` where the output is that width) by a 1x1 convolution (``ChannelLinear``).
Reduction ratios must divide the width they reduce; this is checked when the operator is built.

Batch norms: ``aff``, ``iaff`` and ``sk`` normalise a globally pooled (B, C, 1, 1) map, as their references
do, so in training mode they need a batch of at least 2; with a batch of 1 they raise a ValueError that
names ``norm="group"`` (GroupNorm with one group), which works at any batch size. ``ffm`` and ``tfi`` take
the same ``norm`` option.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fuselab.fusion.base import ChannelLinear, Merge
from fuselab.fusion.basic import project_to_common
from fuselab.fusion.difference import check_batch_statistics, check_odd_kernel, is_batch_norm, resolve_norm
from fuselab.registry import FUSIONS


def check_reduction(width: int, reduction: int, where: str, *, what: str = "common width") -> int:
    """The reduced width ``width // reduction``; a ValueError unless ``reduction`` divides ``width``."""
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"{where}: reduction must be a positive integer, got {reduction!r}")
    if width % reduction:
        raise ValueError(f"{where}: {what} {width} is not divisible by reduction {reduction}")
    return width // reduction


def softmax_with_reference(logits: Tensor, n_modalities: int) -> Tensor:
    """Weights over M modalities from M - 1 logit maps, the last modality's logit fixed at 0.

    With two modalities this is exactly ``sigmoid(l), 1 - sigmoid(l)``; softmax is shift-invariant, so
    fixing one logit loses nothing.

    Args:
        logits: (B, (M - 1) C, H', W').

    Returns:
        (M, B, C, H', W'), summing to 1 over the first axis.
    """
    logits = rearrange(logits, "b (m c) h w -> m b c h w", m=n_modalities - 1)
    return torch.cat([logits, torch.zeros_like(logits[:1])], dim=0).softmax(0)


class _MapMerge(Merge):
    """A map merge whose modalities are projected to a common width ``self.width`` (the output width)."""

    forms = ("map",)
    natural_out_dim = "the largest input width"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        self.width = out_dim or max(self.dims.values())
        self.proj = project_to_common(self.dims, self.width)
        self.out_dim = self.width

    def common(self, xs: Mapping[str, Tensor]) -> Tensor:
        """(M, B, width, H, W), modalities in sorted order (whatever the order of ``xs``)."""
        return torch.stack([self.proj[m](xs[m]) for m in self.modalities], dim=0)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(W_2 relu(W_1 GAP(x)))`` (ESANet's SqueezeAndExcitation)."""

    def __init__(self, channels: int, *, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.fc(F.adaptive_avg_pool2d(x, 1))  # (B, C, H, W) * (B, C, 1, 1)


@FUSIONS.register("se-add")
class SEAdd(_MapMerge):
    """Squeeze-and-excitation per modality, then a sum.

    Paper: Seichter et al., "Efficient RGB-D Semantic Segmentation for Indoor Scene Analysis" (ESANet),
    ICRA 2021. Reference: TUI-NICR/ESANet ``src/models/rgb_depth_fusion.py`` (SqueezeAndExciteFusionAdd,
    reduction 16). Rule for M modalities: the sum of ``SE_m(x_m)``, one SE block per modality.
    """

    multimodal_rule = "sum over modalities of SE_m(x_m), one squeeze-and-excitation block per modality"
    paper = "Seichter et al., Efficient RGB-D Semantic Segmentation for Indoor Scene Analysis (ESANet), ICRA 2021"
    reference = "TUI-NICR/ESANet src/models/rgb_depth_fusion.py (SqueezeAndExciteFusionAdd)"
    formula = "z = sum_m x_m * sigmoid(W_2m relu(W_1m GAP(x_m)))"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None, *, reduction: int = 16) -> None:
        super().__init__(dims, out_dim)
        hidden = check_reduction(self.width, reduction, "se-add")
        self.se = nn.ModuleDict({m: SqueezeExcite(self.width, hidden=hidden) for m in self.modalities})

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        return sum(self.se[m](x) for m, x in zip(self.modalities, self.common(xs)))


@FUSIONS.register("acm")
class ACM(_MapMerge):
    """ACNet's attention complementary module: each modality reweighted by ``sigmoid(Conv1x1(GAP x))``,
    then summed.

    Paper: Hu et al., "ACNet: Attention Based Network to Exploit Complementary Features for RGBD Semantic
    Segmentation", ICIP 2019. Reference: anheidelonghu/ACNet ``ACNet_models_V1.py`` (``channel_attention``:
    GAP, a full C x C 1x1 convolution, sigmoid). Rule for M modalities: the sum over all modalities.
    """

    multimodal_rule = "sum over modalities of x_m * sigmoid(Conv_m GAP(x_m)), one attention per modality"
    paper = (
        "Hu et al., ACNet: Attention Based Network to Exploit Complementary Features for RGBD Semantic "
        "Segmentation, ICIP 2019"
    )
    reference = "anheidelonghu/ACNet ACNet_models_V1.py (channel_attention)"
    formula = "z = sum_m x_m * sigmoid(W_m GAP(x_m) + b_m)"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        self.attention = nn.ModuleDict(
            {m: nn.Sequential(nn.Conv2d(self.width, self.width, 1), nn.Sigmoid()) for m in self.modalities}
        )

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        common = self.common(xs)  # (M, B, C, H, W)
        return sum(x * self.attention[m](F.adaptive_avg_pool2d(x, 1)) for m, x in zip(self.modalities, common))


class _ConcatGate(Merge):
    """Concatenate all modalities, gate the concatenation, then a 1x1 convolution to ``out_dim``."""

    forms = ("map",)
    natural_out_dim = "the largest input width"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        self.total = sum(self.dims.values())
        self.out_dim = out_dim or max(self.dims.values())
        self.proj = nn.Conv2d(self.total, self.out_dim, 1)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        joint = torch.cat([xs[m] for m in self.modalities], dim=1)  # (B, sum C_m, H, W), sorted order
        return self.proj(self.gate(joint))  # (B, out, H, W)

    def gate(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@FUSIONS.register("cbam")
class CBAM(_ConcatGate):
    """CBAM on the concatenated maps: a channel gate (shared MLP on GAP and GMP) then a spatial gate
    (a ``kernel_size`` convolution on the channel mean and max), then a 1x1 convolution to ``out_dim``.

    Paper: Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018. Reference: Jongchan/
    attention-module ``MODELS/cbam.py``. Difference: the spatial gate is the paper's plain convolution
    on ``[mean, max]``; the reference adds a batch norm after it and stacks ``[max, mean]``. Rule for M
    modalities: all modalities are concatenated in sorted order; ``reduction`` must divide the summed width.
    """

    multimodal_rule = "CBAM on the concatenation of all modalities, then a 1x1 convolution"
    paper = "Woo et al., CBAM: Convolutional Block Attention Module, ECCV 2018"
    reference = "Jongchan/attention-module MODELS/cbam.py"
    formula = (
        "x = [x_1..x_M], x' = x * sigmoid(MLP(GAP x) + MLP(GMP x)), "
        "z = W(x' * sigmoid(Conv_k([mean_c x', max_c x'])))"
    )

    def __init__(
        self, dims: Mapping[str, int], out_dim: int | None = None, *, reduction: int = 16, kernel_size: int = 7
    ) -> None:
        super().__init__(dims, out_dim)
        hidden = check_reduction(self.total, reduction, "cbam", what="summed width")
        kernel_size = check_odd_kernel(kernel_size, "cbam")
        self.mlp = nn.Sequential(
            nn.Conv2d(self.total, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, self.total, 1)
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def gate(self, x: Tensor) -> Tensor:
        channel = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))  # (B, C, 1, 1)
        x = x * channel.sigmoid()
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return x * self.spatial(pooled).sigmoid()


def eca_kernel_size(channels: int, *, gamma: int = 2, beta: int = 1) -> int:
    """ECA-Net's adaptive kernel size ``k = |t|_odd``, ``t = (log2(C) + beta) / gamma``, and at least 3.

    As the reference code: ``t`` is truncated to an integer and an even one goes up by 1, which is the odd
    integer nearest to ``t`` (a tie at an even integer goes up). Below C = 8 that gives 1, a convolution
    that sees one channel, i.e. no cross-channel interaction at all; as timm (``layers/eca.py``), the size is
    clamped to at least 3. From C = 8 on the rule is the paper's.
    """
    t = int(abs((math.log2(channels) + beta) / gamma))
    return max(t if t % 2 else t + 1, 3)


@FUSIONS.register("eca")
class ECA(_ConcatGate):
    """Efficient channel attention on the concatenated maps: ``x * sigmoid(Conv1d_k(GAP x))``, then a 1x1
    convolution to ``out_dim``.

    Paper: Wang et al., "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", CVPR
    2020. Reference: BangguWu/ECANet ``models/eca_module.py``. ``kernel_size=None`` (the default) picks the
    paper's adaptive size from the summed width (gamma 2, b 1; ``eca_kernel_size``), at least 3 as in timm
    (below a summed width of 8 the paper's rule gives 1, no interaction between channels); the reference
    module hard-codes 3. An explicit ``kernel_size`` is used as given. Rule for M modalities: all
    modalities are concatenated in sorted order.
    """

    multimodal_rule = "ECA on the concatenation of all modalities, then a 1x1 convolution"
    paper = "Wang et al., ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks, CVPR 2020"
    reference = "BangguWu/ECANet models/eca_module.py"
    formula = "x = [x_1..x_M], z = W(x * sigmoid(Conv1d_k(GAP x))), k = max(odd(|log2(C)/2 + 1/2|), 3)"

    def __init__(
        self, dims: Mapping[str, int], out_dim: int | None = None, *, kernel_size: int | None = None
    ) -> None:
        super().__init__(dims, out_dim)
        self.kernel_size = check_odd_kernel(
            eca_kernel_size(self.total) if kernel_size is None else kernel_size, "eca"
        )
        self.conv = nn.Conv1d(1, 1, self.kernel_size, padding=self.kernel_size // 2, bias=False)

    def gate(self, x: Tensor) -> Tensor:
        y = rearrange(F.adaptive_avg_pool2d(x, 1), "b c 1 1 -> b 1 c")
        y = rearrange(self.conv(y), "b 1 c -> b c 1 1")  # a 1-D convolution across neighbouring channels
        return x * y.sigmoid()


class MultiScaleChannelAttention(nn.Module):
    """MS-CAM logits: a pointwise (local) bottleneck plus a GAP (global) bottleneck, summed.

    Args:
        channels: input width C.
        out_channels: logit channels (C for one sigmoid gate; (M - 1) C for M modalities).
        hidden: bottleneck width C / r.
    """

    def __init__(self, channels: int, out_channels: int, *, hidden: int, norm: type[nn.Module]) -> None:
        super().__init__()

        def bottleneck() -> nn.Sequential:  # convolutions before a norm carry no bias: the norm cancels it
            return nn.Sequential(
                nn.Conv2d(channels, hidden, 1, bias=False),
                norm(hidden),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, out_channels, 1, bias=False),
                norm(out_channels),
            )

        self.local_att = bottleneck()
        self.global_att = bottleneck()

    def forward(self, x: Tensor) -> Tensor:
        return self.local_att(x) + self.global_att(F.adaptive_avg_pool2d(x, 1))  # (B, C', H, W) + (B, C', 1, 1)


@FUSIONS.register("aff")
class AFF(_MapMerge):
    """Attentional feature fusion: ``M(a + b) * a + (1 - M(a + b)) * b`` with the multi-scale channel
    attention ``M`` (MS-CAM, reduction 4).

    Paper: Dai et al., "Attentional Feature Fusion", WACV 2021. Reference: YimianDai/open-aff
    ``aff_pytorch/aff_net/fusion.py`` (AFF). Differences: the paper's formula, without the factor 2 that
    both reference implementations put on the two terms (``scale=2`` restores it); convolutions before a
    batch norm carry no bias. ``norm``: ``"batch"`` (the reference's BatchNorm2d; needs a batch of 2 or more
    in training, its global branch being pooled), ``"group"`` (GroupNorm with one group) or a norm class.
    Rule for M modalities: MS-CAM of the sum gives M - 1 logit maps, the last
    modality's logit is fixed at 0, and a softmax over modalities weights the sum; with two modalities this
    is exactly the paper's sigmoid, the first modality (sorted) taking ``M`` and the second ``1 - M``.
    """

    multimodal_rule = (
        "MS-CAM of sum_m x_m gives M - 1 logits per element (last modality fixed at 0); "
        "z = sum_m softmax_m * x_m (the paper's sigmoid when M = 2)"
    )
    paper = "Dai et al., Attentional Feature Fusion, WACV 2021"
    reference = "YimianDai/open-aff aff_pytorch/aff_net/fusion.py (AFF)"
    formula = "w = softmax([MS-CAM(sum_m x_m), 0]), z = sum_m w_m * x_m (M = 2: M(a+b) a + (1 - M(a+b)) b)"

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int | None = None,
        *,
        reduction: int = 4,
        scale: float = 1.0,
        norm: str | type[nn.Module] = "batch",
    ) -> None:
        super().__init__(dims, out_dim)
        hidden = check_reduction(self.width, reduction, "aff")
        norm = resolve_norm(norm, "aff")
        self.batch_norm = is_batch_norm(norm)
        self.scale = float(scale)
        n_logits = (len(self.dims) - 1) * self.width
        self.attention = MultiScaleChannelAttention(self.width, n_logits, hidden=hidden, norm=norm)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        stacked = self.common(xs)  # (M, B, C, H, W)
        check_batch_statistics(self, stacked[0], "aff", batch_norm=self.batch_norm, pooled=True)
        weights = softmax_with_reference(self.attention(stacked.sum(0)), len(xs))
        return self.scale * (weights * stacked).sum(0)


@FUSIONS.register("iaff")
class IAFF(_MapMerge):
    """Iterative attentional feature fusion: AFF whose initial integration ``a + b`` is itself an AFF, with
    a second, separate MS-CAM.

    Paper: Dai et al., "Attentional Feature Fusion", WACV 2021. Reference: YimianDai/open-aff
    ``aff_pytorch/aff_net/fusion.py`` (iAFF). Difference: the PyTorch iAFF there computes its second
    global branch with the first one's weights (``self.global_att(xi)``, leaving ``global_att2`` unused);
    fuselab uses a second, separate MS-CAM as the paper (and the MXNet code) does. Convolutions before a
    batch norm carry no bias. ``norm`` as in ``aff``. Rule for M modalities: as ``aff``, in both iterations.
    """

    multimodal_rule = "as aff (softmax over M weights, last logit fixed at 0), in both iterations"
    paper = "Dai et al., Attentional Feature Fusion, WACV 2021"
    reference = "YimianDai/open-aff aff_pytorch/aff_net/fusion.py (iAFF; model/fusion.py for the second MS-CAM)"
    formula = "w1 = softmax([M1(sum x_m), 0]), u = sum w1_m x_m, w2 = softmax([M2(u), 0]), z = sum w2_m x_m"

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int | None = None,
        *,
        reduction: int = 4,
        norm: str | type[nn.Module] = "batch",
    ) -> None:
        super().__init__(dims, out_dim)
        hidden = check_reduction(self.width, reduction, "iaff")
        norm = resolve_norm(norm, "iaff")
        self.batch_norm = is_batch_norm(norm)
        n_logits = (len(self.dims) - 1) * self.width
        self.attention1 = MultiScaleChannelAttention(self.width, n_logits, hidden=hidden, norm=norm)
        self.attention2 = MultiScaleChannelAttention(self.width, n_logits, hidden=hidden, norm=norm)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        stacked = self.common(xs)  # (M, B, C, H, W)
        check_batch_statistics(self, stacked[0], "iaff", batch_norm=self.batch_norm, pooled=True)
        initial = (softmax_with_reference(self.attention1(stacked.sum(0)), len(xs)) * stacked).sum(0)
        return (softmax_with_reference(self.attention2(initial), len(xs)) * stacked).sum(0)


@FUSIONS.register("sk")
class SelectiveKernel(_MapMerge):
    """Selective-kernel fusion with the modalities as branches: ``s = GAP(sum_m x_m)``, a bottleneck, one
    logit vector per branch, softmax over branches, weighted sum.

    Paper: Li et al., "Selective Kernel Networks", CVPR 2019 (fuse and select steps; the branches there are
    convolutions with different kernels, here the modalities). Reference: timm ``layers/selective_kernel.py``
    (SelectiveKernelAttn). The bottleneck width is the paper's ``max(C / reduction, min_width)`` with r = 16,
    L = 32, where timm rounds ``C / 16`` to a multiple of 8. ``norm`` as in ``aff`` (the bottleneck's batch
    norm sees the pooled map, so ``"batch"`` needs a batch of 2 or more in training). Natively M-way.
    """

    multimodal_rule = "native: one branch per modality, softmax over the M branches per channel"
    paper = "Li et al., Selective Kernel Networks, CVPR 2019"
    reference = "timm layers/selective_kernel.py (SelectiveKernelAttn)"
    formula = "s = GAP(sum_m x_m), h = relu(BN(W s)), w = softmax_m(W_m h), z = sum_m w_m * x_m"

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int | None = None,
        *,
        reduction: int = 16,
        min_width: int = 32,
        norm: str | type[nn.Module] = "batch",
    ) -> None:
        super().__init__(dims, out_dim)
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"sk: reduction must be a positive integer, got {reduction!r}")
        norm = resolve_norm(norm, "sk")
        self.batch_norm = is_batch_norm(norm)
        hidden = max(self.width // reduction, min_width)
        self.reduce = nn.Sequential(
            nn.Conv2d(self.width, hidden, 1, bias=False), norm(hidden), nn.ReLU(inplace=True)
        )
        self.select = nn.Conv2d(hidden, len(self.dims) * self.width, 1, bias=False)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        stacked = self.common(xs)  # (M, B, C, H, W)
        check_batch_statistics(self, stacked[0], "sk", batch_norm=self.batch_norm, pooled=True)
        logits = self.select(self.reduce(F.adaptive_avg_pool2d(stacked.sum(0), 1)))  # (B, M C, 1, 1)
        weights = rearrange(logits, "b (m c) 1 1 -> m b c 1 1", m=len(xs)).softmax(0)
        return (weights * stacked).sum(0)


class ChannelEmbed(nn.Module):
    """CMX's channel embedding: ``norm(W_res x + norm(W_3 relu(DWConv3x3(W_1 x))))``, all 1x1 but the DW conv."""

    def __init__(self, in_channels: int, out_channels: int, *, hidden: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.residual = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.embed = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),  # no bias: the norm that follows cancels it
            norm(out_channels),
        )
        self.norm = norm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.residual(x) + self.embed(x))


@FUSIONS.register("ffm")
class FeatureFusionModule(_MapMerge):
    """CMX's feature fusion module: efficient cross-attention between the flattened maps (a global context
    ``K^T V`` per head, queried by the other modality), then a channel embedding of the concatenation.

    Paper: Zhang et al., "CMX: Cross-Modal Fusion for RGB-X Semantic Segmentation with Transformers", IEEE
    T-ITS 2023. Reference: huaaaliu/RGBX_Semantic_Segmentation ``models/net_utils.py`` (FeatureFusionModule,
    CrossPath, CrossAttention, ChannelEmbed), with its initialisation. Per modality: ``[y, u] = relu(W x)``,
    ``K, V = W_kv u``, context ``softmax_rows(K^T V / sqrt(e))``; ``u`` (the query, unprojected as in the
    reference) reads the other modality's context; ``x' = LN(x + W_end [y, u ctx])``. Rule for M modalities:
    each modality queries the mean of the other modalities' contexts, and the channel embedding takes the
    concatenation of all M maps. Difference: the convolution before the embedding's inner batch norm has no
    bias (the norm cancels it). ``num_heads`` defaults to 1 (CMX's first stage; later stages use 2, 5, 8).
    ``norm`` (of the channel embedding) as in ``aff``.
    """

    multimodal_rule = (
        "each modality's queries read the mean of the other modalities' K^T V contexts; embed [x'_1..x'_M]"
    )
    paper = "Zhang et al., CMX: Cross-Modal Fusion for RGB-X Semantic Segmentation with Transformers, T-ITS 2023"
    reference = "huaaaliu/RGBX_Semantic_Segmentation models/net_utils.py (FeatureFusionModule)"
    formula = (
        "[y_m, u_m] = relu(W_m x_m), ctx_m = softmax(K_m^T V_m / sqrt(e)), "
        "x'_m = LN(x_m + W_m' [y_m, u_m mean_{n != m} ctx_n]), z = ChannelEmbed([x'_1..x'_M])"
    )

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int | None = None,
        *,
        num_heads: int = 1,
        reduction: int = 1,
        qkv_bias: bool = False,
        norm: str | type[nn.Module] = "batch",
    ) -> None:
        super().__init__(dims, out_dim)
        width = self.width
        inner = check_reduction(width, reduction, "ffm")
        norm = resolve_norm(norm, "ffm")
        self.batch_norm = is_batch_norm(norm)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"ffm: num_heads must be a positive integer, got {num_heads!r}")
        if inner % num_heads:
            raise ValueError(
                f"ffm: attention width {inner} (width / reduction) is not divisible by num_heads {num_heads}"
            )
        self.num_heads = num_heads
        self.scale = (inner // num_heads) ** -0.5
        names = self.modalities
        self.channel_proj = nn.ModuleDict({m: nn.Linear(width, 2 * inner) for m in names})
        self.kv = nn.ModuleDict({m: nn.Linear(inner, 2 * inner, bias=qkv_bias) for m in names})
        self.end_proj = nn.ModuleDict({m: nn.Linear(2 * inner, width) for m in names})
        self.token_norm = nn.ModuleDict({m: nn.LayerNorm(width) for m in names})
        self.embed = ChannelEmbed(len(names) * width, width, hidden=inner, norm=norm)
        self.apply(_cmx_init)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        common = self.common(xs)  # (M, B, C, H, W)
        check_batch_statistics(self, common[0], "ffm", batch_norm=self.batch_norm)
        h, w = common.shape[-2:]
        tokens = {m: rearrange(x, "b c h w -> b (h w) c") for m, x in zip(self.modalities, common)}
        direct, query, contexts = {}, {}, []
        for m, t in tokens.items():
            direct[m], u = F.relu(self.channel_proj[m](t)).chunk(2, dim=-1)  # (B, N, inner) each
            query[m] = rearrange(u, "b n (h e) -> b h n e", h=self.num_heads)
            k, v = rearrange(self.kv[m](u), "b n (two h e) -> two b h n e", two=2, h=self.num_heads)
            ctx = torch.einsum("bhni,bhnj->bhij", k, v) * self.scale  # (B, heads, e, e)
            contexts.append(ctx.softmax(dim=-2))  # softmax over the key features, as in CMX
        context = torch.stack(contexts, dim=0)  # (M, B, heads, e, e)
        others = (context.sum(0, keepdim=True) - context) / (len(xs) - 1)  # mean of the other modalities
        outs = []
        for i, (m, t) in enumerate(tokens.items()):
            attended = rearrange(torch.einsum("bhni,bhij->bhnj", query[m], others[i]), "b h n e -> b n (h e)")
            outs.append(self.token_norm[m](t + self.end_proj[m](torch.cat([direct[m], attended], dim=-1))))
        merged = rearrange(torch.cat(outs, dim=-1), "b (h w) c -> b c h w", h=h, w=w)  # (B, M C, H, W)
        return self.embed(merged)


def _cmx_init(module: nn.Module) -> None:
    """CMX's initialisation: truncated normal (std 0.02) Linear, unit LayerNorm, fan-out normal convolutions."""
    if isinstance(module, nn.Linear) and not isinstance(module, ChannelLinear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@FUSIONS.register("mixing")
class Mixing(_MapMerge):
    """TinyCD's mixing block: interleave the channels of all modalities, then a grouped convolution that
    sees one channel of each modality per group, PReLU and instance norm.

    Paper: Codegoni et al., "TINYCD: A (Not So) Deep Learning Model For Change Detection", Neural Computing
    and Applications 2023. Reference: AndreaCodegoni/Tiny_model_4_CD (MixingBlock; also open-cd
    ``models/backbones/tinycd.py``). Natively M-way: each group holds the M channels ``(x_1c, ..., x_Mc)``.
    """

    multimodal_rule = "native: channels interleaved as (x_1c, ..., x_Mc), one convolution group per channel"
    paper = "Codegoni et al., TINYCD: A (Not So) Deep Learning Model For Change Detection, NCA 2023"
    reference = "AndreaCodegoni/Tiny_model_4_CD models/layers.py (MixingBlock); open-cd models/backbones/tinycd.py"
    formula = "z = InstanceNorm(PReLU(GroupConv_k([x_1c, ..., x_Mc]_c)))"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None, *, kernel_size: int = 3) -> None:
        super().__init__(dims, out_dim)
        kernel_size = check_odd_kernel(kernel_size, "mixing")
        self.mix = nn.Sequential(
            nn.Conv2d(
                len(self.dims) * self.width, self.width, kernel_size, padding=kernel_size // 2, groups=self.width
            ),
            nn.PReLU(),
            nn.InstanceNorm2d(self.width),
        )

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        common = self.common(xs)  # (M, B, C, H, W)
        if common.shape[-2:] == (1, 1):  # instance norm over a single position is undefined
            raise ValueError("mixing: instance norm needs maps larger than 1x1; fuse at an earlier stage")
        return self.mix(rearrange(common, "m b c h w -> b (c m) h w"))
