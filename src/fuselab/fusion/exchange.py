"""Standalone exchanges between feature-map streams: rectify (CMX), spatial-exchange, channel-exchange-p
(Changer) and channel-exchange (CEN).

Legend: b batch, m modality, c channels, h height, w width of a map.

An exchange returns one map per modality, each the shape of its input. Rule for more than two modalities:
what a modality receives is the mean of what the other modalities send, which for two modalities is
exactly the papers' swap. Streams of different widths: the swaps (spatial-exchange, channel-exchange-p)
stay true swaps and parameter-free, channel k receiving the mean of the other streams that have a channel
k (a stream keeps its own channel k where no other has one), as CEN does; rectify, whose weights need one
width, meets at the largest width, a sender projected up by a 1x1 convolution (``ChannelLinear``) and what
a stream receives projected back to its own width (streams of that width are not projected).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fuselab.fusion.base import ChannelLinear, Exchange
from fuselab.fusion.basic import project_to_common
from fuselab.fusion.maps import check_reduction
from fuselab.registry import FUSIONS


def mean_of_others(xs: Sequence[Tensor]) -> list[Tensor]:
    """For each of M >= 2 tensors (B, C_m, ...), what it receives from the others: the mean of the other ones
    (for M = 2 and equal shapes, the other one itself).

    Widths C_m may differ: channel k then receives the mean over the other tensors that have a channel k,
    and keeps its own value where none has (for two tensors, a swap of the channels both have).
    """
    widths = [x.shape[1] for x in xs]
    if len(set(widths)) == 1:
        if len(xs) == 2:
            return [xs[1], xs[0]]
        return [torch.stack([y for j, y in enumerate(xs) if j != i], dim=0).mean(0) for i in range(len(xs))]
    out = []
    for i, x in enumerate(xs):
        width = widths[i]
        others = [y[:, :width] for j, y in enumerate(xs) if j != i]  # each (B, min(C_j, C_i), ...)
        total = sum(F.pad(y, (0, 0) * (y.dim() - 2) + (0, width - y.shape[1])) for y in others)  # (B, C_i, ...)
        count = sum((torch.arange(width, device=x.device) < y.shape[1]).to(x.dtype) for y in others)  # (C_i,)
        count = count.view(-1, *([1] * (x.dim() - 2)))
        out.append(torch.where(count > 0, total / count.clamp_min(1), x))
    return out


def check_fraction(p: float, where: str) -> int:
    """The period ``1 / p`` of an exchange that swaps a fraction ``p`` = 1/k of the channels or columns."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"{where}: p must be a fraction 1/k in (0, 1], got {p!r}")
    period = round(1 / p)
    if abs(period * p - 1) > 1e-6:
        raise ValueError(f"{where}: p must be 1/k for an integer k (every k-th index is exchanged), got {p!r}")
    return period


class _MapExchange(Exchange):
    """An exchange of maps through a common width ``self.width`` (the largest input width)."""

    forms = ("map",)
    natural_out_dim = "each modality keeps its own width"

    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__(dims)
        self.width = max(self.dims.values())
        self.to_common = project_to_common(self.dims, self.width)
        self.from_common = nn.ModuleDict(
            {m: ChannelLinear(self.width, d) if d != self.width else nn.Identity() for m, d in self.dims.items()}
        )

    def common(self, xs: Mapping[str, Tensor]) -> list[Tensor]:
        """M maps (B, width, H, W), in the order of ``xs``."""
        return [self.to_common[m](x) for m, x in xs.items()]


class _PeriodicSwap(Exchange):
    """Replace every ``1/p``-th index of one axis by the mean of the other modalities; no parameters at any
    widths (at unequal widths, channel k receives what the others have at channel k; see ``mean_of_others``)."""

    forms = ("map",)
    natural_out_dim = "each modality keeps its own width"

    def __init__(self, dims: Mapping[str, int], *, p: float = 0.5) -> None:
        super().__init__(dims)
        self.p = p
        self.period = check_fraction(p, type(self).__name__)

    def exchange(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        incoming = mean_of_others([xs[m] for m in self.modalities])  # M x (B, C_m, H, W)
        return {m: torch.where(self.mask(xs[m]), received, xs[m]) for m, received in zip(self.modalities, incoming)}

    def mask(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@FUSIONS.register("spatial-exchange")
class SpatialExchange(_PeriodicSwap):
    """Changer's spatial exchange: every ``1/p``-th column (index ``w % (1/p) == 0``) is swapped between the
    streams; no parameters.

    Paper: Fang et al., "Changer: Feature Interaction is What You Need for Change Detection", IEEE TGRS 2023.
    Reference: open-cd ``models/utils/interaction_layer.py`` (SpatialExchange, p = 1/2). Rule for M
    modalities: an exchanged column receives the mean of the other modalities' columns. Unequal widths: in
    an exchanged column, channel k receives the other modalities' channel k (their mean) and keeps its own
    where no other modality has a channel k; still no parameters.
    """

    multimodal_rule = "an exchanged column receives the mean of the other modalities' columns (a swap for two)"
    paper = "Fang et al., Changer: Feature Interaction is What You Need for Change Detection, TGRS 2023"
    reference = "open-cd models/utils/interaction_layer.py (SpatialExchange)"
    formula = "x'_m[..., w] = mean_{n != m} x_n[..., w] if w % (1/p) == 0 else x_m[..., w]"

    def mask(self, x: Tensor) -> Tensor:
        return torch.arange(x.shape[-1], device=x.device) % self.period == 0  # (W,)


@FUSIONS.register("channel-exchange-p")
class ChannelExchangeP(_PeriodicSwap):
    """Changer's channel exchange: every ``1/p``-th channel (index ``c % (1/p) == 0``) is swapped between the
    streams; no parameters.

    Paper: Fang et al., "Changer: Feature Interaction is What You Need for Change Detection", IEEE TGRS 2023.
    Reference: open-cd ``models/utils/interaction_layer.py`` (ChannelExchange, p = 1/2). Rule for M
    modalities: an exchanged channel receives the mean of the other modalities' channels. Unequal widths:
    exchanged channel k receives the other modalities' channel k (their mean; for two, a true swap of the
    channels both have) and keeps its own where no other modality has a channel k; still no parameters.
    """

    multimodal_rule = "an exchanged channel receives the mean of the other modalities' channels (a swap for two)"
    paper = "Fang et al., Changer: Feature Interaction is What You Need for Change Detection, TGRS 2023"
    reference = "open-cd models/utils/interaction_layer.py (ChannelExchange)"
    formula = "x'_m[:, c] = mean_{n != m} x_n[:, c] if c % (1/p) == 0 else x_m[:, c]"

    def mask(self, x: Tensor) -> Tensor:
        return (torch.arange(x.shape[1], device=x.device) % self.period == 0).view(-1, 1, 1)  # (C, 1, 1)


@FUSIONS.register("rectify")
class FeatureRectify(_MapExchange):
    """CMX's cross-modal feature rectification: each stream adds the other stream, reweighted by channel
    weights (an MLP on ``[GAP, GMP]`` of all streams) and spatial weights (1x1 convolutions on all streams).

    Paper: Zhang et al., "CMX: Cross-Modal Fusion for RGB-X Semantic Segmentation with Transformers", IEEE
    T-ITS 2023. Reference: huaaaliu/RGBX_Semantic_Segmentation ``models/net_utils.py``
    (FeatureRectifyModule, ChannelWeights, SpatialWeights; reduction 1, lambda_c = lambda_s = 0.5). Rule
    for M modalities: the weights are computed from all M streams (one channel and one spatial weight map
    per stream), and a stream adds the mean of the other streams' reweighted maps.
    """

    multimodal_rule = "weights from all M streams; each stream adds the mean of the other streams' reweighted maps"
    paper = "Zhang et al., CMX: Cross-Modal Fusion for RGB-X Semantic Segmentation with Transformers, T-ITS 2023"
    reference = "huaaaliu/RGBX_Semantic_Segmentation models/net_utils.py (FeatureRectifyModule)"
    formula = (
        "w_c = sigmoid(MLP([GAP, GMP]([x_1..x_M]))), w_s = sigmoid(Conv(relu(Conv([x_1..x_M])))), "
        "x'_m = x_m + mean_{n != m} (lambda_c w_c,n + lambda_s w_s,n) * x_n"
    )

    def __init__(
        self, dims: Mapping[str, int], *, reduction: int = 1, lambda_c: float = 0.5, lambda_s: float = 0.5
    ) -> None:
        super().__init__(dims)
        n, width = len(self.dims), self.width
        spatial_hidden = check_reduction(width, reduction, "rectify")
        pooled = 2 * n * width  # [GAP, GMP] of the concatenation
        self.lambda_c = float(lambda_c)
        self.lambda_s = float(lambda_s)
        self.channel_weights = nn.Sequential(
            nn.Linear(pooled, pooled // reduction), nn.ReLU(inplace=True), nn.Linear(pooled // reduction, n * width)
        )
        self.spatial_weights = nn.Sequential(
            nn.Conv2d(n * width, spatial_hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(spatial_hidden, n, 1)
        )

    def exchange(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        stacked = torch.stack(self.common({m: xs[m] for m in self.modalities}), dim=0)  # (M, B, C, H, W), sorted
        joint = rearrange(stacked, "m b c h w -> b (m c) h w")
        pooled = torch.cat([joint.mean((-2, -1)), joint.amax((-2, -1))], dim=1)  # (B, 2 M C)
        channel = rearrange(self.channel_weights(pooled).sigmoid(), "b (m c) -> m b c 1 1", m=len(xs))
        spatial = rearrange(self.spatial_weights(joint).sigmoid(), "b m h w -> m b 1 h w")
        sent = (self.lambda_c * channel + self.lambda_s * spatial) * stacked  # (M, B, C, H, W)
        incoming = mean_of_others(list(sent))
        return {m: xs[m] + self.from_common[m](received) for m, received in zip(self.modalities, incoming)}


def owned_parts(dims: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """CEN's disjoint channel parts: with M modalities in sorted order, modality i owns channels
    ``[i C / M, (i + 1) C / M)`` of its own width C."""
    names = sorted(dims)
    return {m: ((i * dims[m]) // len(names), ((i + 1) * dims[m]) // len(names)) for i, m in enumerate(names)}


def sparsity_l1(norms: Mapping[str, nn.BatchNorm2d], parts: Mapping[str, tuple[int, int]]) -> Tensor:
    """CEN's L1 term: |BN scale| summed over each modality's own part of the channels."""
    return torch.stack([norms[m].weight[lo:hi].abs().sum() for m, (lo, hi) in parts.items()]).sum()


@torch.no_grad()
def soft_threshold_(norms: Mapping[str, nn.BatchNorm2d], parts: Mapping[str, tuple[int, int]], amount: float) -> None:
    """The proximal operator of ``amount * L1`` on each modality's own part of its BN scales, in place:
    ``gamma <- sign(gamma) max(|gamma| - amount, 0)``. A scale within ``amount`` of zero becomes exactly 0;
    the others move towards zero by exactly ``amount``, whatever the optimiser did before."""
    if amount <= 0:
        return
    for m, (lo, hi) in parts.items():
        gamma = norms[m].weight[lo:hi]
        gamma.copy_(gamma.sign() * (gamma.abs() - amount).clamp_min(0))


def check_proximal_l1(value: float, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{where}: proximal_l1 must be a number >= 0 (0 = off), got {value!r}")
    return float(value)


@FUSIONS.register("channel-exchange")
class ChannelExchange(Exchange):
    """CEN's channel exchanging: each modality's private batch norm, then every channel whose BN scale is
    below ``threshold`` in magnitude is replaced by the mean of the other modalities' (normalised) channels
    at that position; ``aux_losses()`` gives the L1 sparsity term on the BN scales of one disjoint part of
    the channels per modality, the exchangeable ones.

    Input: per modality the **pre-norm** output of a convolution (in CEN the convolution is shared by the
    modalities and only the batch norms are private); this operator is that layer's batch norm plus the
    exchange, so in a network of one's own it replaces the BN after the conv where streams should exchange::

        self.exchange = create_fusion("channel-exchange", dims={"rgb": 64, "depth": 64})
        h = {m: self.conv(x[m]) for m in x}          # shared conv, no BN
        h = {m: F.relu(v) for m, v in self.exchange(h).items()}
        loss = ce + 2e-4 * self.exchange.aux_losses()["cen_sparsity"]   # or loss term cen-sparsity

    Parts: with M modalities in sorted order, modality i owns channels ``[i C / M, (i + 1) C / M)`` of its
    own width C (for two, the first and the second half, as the official code slices its BN scales). The
    threshold applies to every channel, as in the official code; the L1 term drives only the owned part
    towards zero, so in practice those are the channels that get exchanged. The test is strict, as in the
    official code: a scale exactly at the threshold is kept, and it is the magnitude |gamma| that counts (L1
    training drives scales across zero, and a large negative scale is not exchanged).

    ``proximal_l1`` = lambda > 0 applies the L1 term as a proximal step instead of a loss term: after every
    optimiser step the training loop calls ``proximal_step(lr)``, which soft-thresholds the owned scales,
    ``gamma <- sign(gamma) max(|gamma| - lr lambda, 0)``. Scales reach exact zeros and drift towards zero at a
    rate proportional to lambda under any optimiser (under Adam an L1 loss term moves a scale by about lr
    per step whatever its weight).

    Paper: Wang et al., "Deep Multimodal Fusion by Channel Exchanging", NeurIPS 2020. Reference: yikaiw/CEN
    ``semantic_segmentation/models/modules.py`` (Exchange, BatchNorm2dParallel) and ``main.py`` (the L1
    term on half of each BN's scales, lambda 2e-4, threshold 2e-2). Rule for M modalities (the official code
    handles two): an exchanged channel receives the mean of the other modalities' channels, which for two
    is exactly the official swap. Unequal widths: channel k receives the mean over the other modalities
    that have a channel k; where none has, it keeps its own value.
    """

    forms = ("map",)
    multimodal_rule = ("a channel whose |BN scale| < threshold receives the mean of the other modalities' "
                       "channels (a swap for two); one disjoint part of the channels per modality is sparsified")
    natural_out_dim = "each modality keeps its own width"
    paper = "Wang et al., Deep Multimodal Fusion by Channel Exchanging, NeurIPS 2020"
    reference = "yikaiw/CEN semantic_segmentation/models/modules.py (Exchange, BatchNorm2dParallel), main.py (L1 on BN scales)"
    formula = ("y_m = BN_m(x_m); y'_m[:, c] = mean_{n != m} y_n[:, c] if |gamma_m[c]| < threshold else y_m[:, c]; "
               "L_sparsity = sum_m sum_{c in part_m} |gamma_m[c]|")

    @classmethod
    def fusion_problem(cls, options: Mapping[str, Any]) -> str | None:
        threshold = options.get("threshold", 2e-2)
        if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold <= 0:
            return (f"exchange.threshold={threshold}: no |BN scale| is below it, so channel-exchange exchanges no "
                    "channel; use a threshold above 0 (CEN: 2e-2)")
        return None

    def __init__(self, dims: Mapping[str, int], *, threshold: float = 2e-2, proximal_l1: float = 0.0) -> None:
        super().__init__(dims)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
            raise ValueError(f"channel-exchange: threshold must be a number >= 0, got {threshold!r}")
        self.proximal_l1 = check_proximal_l1(proximal_l1, "channel-exchange")
        n = len(self.modalities)
        narrow = {m: d for m, d in self.dims.items() if d < n}
        if narrow:
            m = min(narrow)
            raise ValueError(f"channel-exchange: modality '{m}' has {narrow[m]} channels; each of the {n} "
                             f"modalities owns a part of the channels, so every width must be >= {n}")
        self.threshold = float(threshold)
        self.norms = nn.ModuleDict({m: nn.BatchNorm2d(d) for m, d in self.dims.items()})
        self.parts = owned_parts(self.dims)
        self.width = max(self.dims.values())
        self.equal = len(set(self.dims.values())) == 1

    def exchanged(self) -> dict[str, Tensor]:
        """Per modality, the (C,) booleans of the channels that are replaced (|gamma| < threshold)."""
        return {m: self.norms[m].weight.detach().abs() < self.threshold for m in self.modalities}

    def incoming(self, ys: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per modality, what each of its channels would receive: the mean of the other modalities there."""
        if self.equal:
            return dict(zip(self.modalities, mean_of_others([ys[m] for m in self.modalities])))
        b, _, h, w = next(iter(ys.values())).shape
        padded, present = [], []
        for m in self.modalities:
            y = ys[m]
            pad = y.new_zeros(b, self.width - y.shape[1], h, w)
            padded.append(torch.cat([y, pad], dim=1))
            present.append(torch.arange(self.width, device=y.device) < y.shape[1])
        total, count = torch.stack(padded).sum(0), torch.stack(present).sum(0)
        out = {}
        for i, m in enumerate(self.modalities):
            d = self.dims[m]
            others = (count - present[i].long())[:d]  # how many other modalities have channel k
            mean = (total - padded[i])[:, :d] / others.clamp_min(1).view(1, -1, 1, 1).to(total.dtype)
            out[m] = torch.where((others > 0).view(1, -1, 1, 1), mean, ys[m])
        return out

    def exchange(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        ys = {m: self.norms[m](xs[m]) for m in self.modalities}
        received = self.incoming(ys)
        return {
            m: torch.where((self.norms[m].weight.abs() < self.threshold).view(1, -1, 1, 1), received[m], ys[m])
            for m in xs
        }

    def aux_losses(self) -> dict[str, Tensor]:
        """``cen_sparsity``: sum over modalities of |gamma| on that modality's own part of the channels."""
        return {"cen_sparsity": sparsity_l1(self.norms, self.parts)}

    def proximal_step(self, lr: float) -> None:
        """With ``proximal_l1`` = lambda > 0: the L1 term as a proximal step after the optimiser's step, the
        owned BN scales soft-thresholded by ``lr * lambda`` (exact zeros; called by the training loop)."""
        soft_threshold_(self.norms, self.parts, lr * self.proximal_l1)

    def epoch_stats(self) -> dict[str, float]:
        """Per modality, the share of its channels that are currently exchanged, and the share of its own part
        (the channels the L1 term targets) that is (logged once per epoch)."""
        masks = self.exchanged()
        stats = {f"exchanged/{m}": float(mask.float().mean()) for m, mask in masks.items()}
        for m, (lo, hi) in self.parts.items():
            stats[f"exchanged_owned/{m}"] = float(masks[m][lo:hi].float().mean())
        return stats

    carry_stat = "exchanged"  # fusion diagnostics: with no channel exchanged, nothing passed between modalities

    def fusion_stats(self, inputs: Mapping[str, Tensor]) -> dict[str, float]:
        """The exchanged shares of ``epoch_stats`` and ``exchanged``, the share of all channels of all
        modalities that are exchanged (the state of the BN scales; the inputs do not change it)."""
        masks = self.exchanged()
        total = sum(int(mask.sum()) for mask in masks.values()) / sum(mask.numel() for mask in masks.values())
        return {"exchanged": total, **self.epoch_stats()}
