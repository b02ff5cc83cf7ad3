"""``cen``: CEN (channel exchanging) on conv streams, for classification and dense prediction.

Legend: b batch, m modality, s stage, c channels, h height, w width, k classes.

The network of Wang et al. (NeurIPS 2020) at the scale of fuselab's ``conv-streams``:

- **Shared convolutions, private batch norms.** Every convolution is one module for all modalities
  (``shared_weights: true``, run in one batched pass over the modalities stacked on the batch axis); every
  batch norm is private to its modality. ``shared_weights: false`` gives each modality its own
  convolutions (the paper's ablation).
- **Channel exchange in every block.** Each block's first batch norm is a ``channel-exchange`` (the
  private BN of each modality plus the exchange of channels whose |BN scale| is below the threshold), as
  CEN puts the exchange on the middle BN of each ResNet bottleneck: inside the residual branch, so each
  stream keeps its own identity path. Stage 0 is a stem conv whose BN is an exchange; every later stage
  halves the resolution with ``blocks`` basic blocks. ``exchanging: false`` keeps the private BNs and
  exchanges nothing (the baseline of the step-time ratio and of the ablation).
- **Per-modality heads and a learned ensemble.** Each modality has its own head (a pooled classifier, or
  an FPN neck over its stage maps and a dense head); the model's logits are ``sum_m softmax(alpha)_m
  logits_m`` with ``alpha`` initialised equal. As in the official code the ensemble sees the heads'
  logits detached (``detach_ensemble``), so the ensemble's loss trains only ``alpha`` and each stream is
  trained by its own head's loss: the run needs loss term ``aux-unimodal`` (and ``cen-sparsity`` at
  weight 2e-4 for the L1 term on the BN scales).

Loss of a CEN run: ``ce`` (or ``dense-ce``) on the ensemble + ``aux-unimodal`` + ``cen-sparsity``. The
official code's total is ``CE_ens + sum_m CE_m + (M + 1) lambda L1`` (the L1 term is added inside its loop
over the M + 1 outputs): ``aux-unimodal`` with ``reduction: sum`` and ``cen-sparsity`` at weight
(M + 1) lambda, or the L1 term as a proximal step (``proximal_l1`` = (M + 1) lambda, no ``cen-sparsity`` in
the loss, or at weight 0 to log it). The official optimiser is ``train.optimizer=sgd`` (momentum 0.9,
``train.weight_decay=1e-5``) with ``train.freeze_bn=true`` (batch norms normalise with their running
statistics, which stop updating, while their scales and shifts learn); the ``cen-official`` spec uses it.
Under AdamW an L1 loss term moves a scale by about lr per step whatever its weight, so L1 weights are not
comparable one to one across optimisers; the proximal step's drift is lr x lambda under any of them.
Differences from the official network besides its size: stage 0 is a stem conv whose BN also exchanges (the
official stem BN does not), and it is trained from scratch (no ImageNet statistics and scales).

Paper: Wang et al., "Deep Multimodal Fusion by Channel Exchanging", NeurIPS 2020. Reference: yikaiw/CEN
(``semantic_segmentation/models/refinenet.py``, ``modules.py``, ``main.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fuselab.fusion.exchange import ChannelExchange, check_proximal_l1, owned_parts, soft_threshold_, sparsity_l1
from fuselab.models.conv import check_streams
from fuselab.models.heads import ClassificationHead, DenseHead
from fuselab.models.multistream import MultiStream
from fuselab.models.necks import make_neck
from fuselab.registry import MODELS


class ParallelConv(nn.Module):
    """One convolution for all modalities (a batched pass over them stacked on the batch axis), or one per
    modality: ``{m: x_m} -> {m: conv(x_m)}``."""

    def __init__(self, modalities: Sequence[str], make: Callable[[str], nn.Module], *, shared: bool) -> None:
        super().__init__()
        self.shared = shared
        if shared:
            self.conv = make(modalities[0])
        else:
            self.convs = nn.ModuleDict({m: make(m) for m in modalities})

    def forward(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not self.shared:
            return {m: self.convs[m](x) for m, x in xs.items()}
        names = sorted(xs)
        out = self.conv(torch.cat([xs[m] for m in names], dim=0))
        return dict(zip(names, out.chunk(len(names), dim=0)))


class ParallelNorm(nn.Module):
    """A private batch norm per modality: ``{m: x_m} -> {m: BN_m(x_m)}``."""

    def __init__(self, modalities: Sequence[str], channels: int) -> None:
        super().__init__()
        self.norms = nn.ModuleDict({m: nn.BatchNorm2d(channels) for m in modalities})

    def forward(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.norms[m](x) for m, x in xs.items()}


class SparseParallelNorm(ParallelNorm):
    """Private batch norms in the place of a channel exchange that is switched off (``exchanging: false``):
    the same L1 term on the same parts of the BN scales (``cen_sparsity``), no exchange, so an ablation
    changes only the exchange."""

    def __init__(self, modalities: Sequence[str], channels: int, *, proximal_l1: float = 0.0) -> None:
        super().__init__(modalities, channels)
        self.parts = owned_parts({m: channels for m in modalities})
        self.proximal_l1 = check_proximal_l1(proximal_l1, "cen")

    def aux_losses(self) -> dict[str, Tensor]:
        return {"cen_sparsity": sparsity_l1(self.norms, self.parts)}

    def proximal_step(self, lr: float) -> None:
        """The same proximal L1 step as ``ChannelExchange.proximal_step``."""
        soft_threshold_(self.norms, self.parts, lr * self.proximal_l1)


def _relu(xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {m: torch.relu(x) for m, x in xs.items()}


def _norm_or_exchange(modalities: Sequence[str], channels: int, exchanging: bool, threshold: float,
                      proximal_l1: float) -> nn.Module:
    if exchanging:
        return ChannelExchange({m: channels for m in modalities}, threshold=threshold, proximal_l1=proximal_l1)
    return SparseParallelNorm(modalities, channels, proximal_l1=proximal_l1)


class CENStem(nn.Module):
    """Stage 0: a 3x3 conv at full resolution, its BN an exchange (or private BNs), ReLU."""

    def __init__(self, modalities: Sequence[str], in_channels: Mapping[str, int], out_channels: int, *, shared: bool,
                 exchanging: bool, threshold: float, proximal_l1: float = 0.0) -> None:
        super().__init__()
        self.conv = ParallelConv(
            modalities, lambda m: nn.Conv2d(in_channels[m], out_channels, 3, padding=1, bias=False), shared=shared)
        self.norm = _norm_or_exchange(modalities, out_channels, exchanging, threshold, proximal_l1)

    def forward(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _relu(self.norm(self.conv(xs)))


class CENBlock(nn.Module):
    """A basic residual block whose first BN is the exchange: conv3x3 -> exchange -> ReLU -> conv3x3 -> BN_m,
    plus the (projected) input, ReLU."""

    def __init__(self, modalities: Sequence[str], in_channels: int, out_channels: int, *, stride: int,
                 shared: bool, exchanging: bool, threshold: float, proximal_l1: float = 0.0) -> None:
        super().__init__()
        self.conv1 = ParallelConv(modalities, lambda _: nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                                                                bias=False), shared=shared)
        self.norm1 = _norm_or_exchange(modalities, out_channels, exchanging, threshold, proximal_l1)
        self.conv2 = ParallelConv(modalities, lambda _: nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                                  shared=shared)
        self.norm2 = ParallelNorm(modalities, out_channels)
        self.project: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.project = ParallelConv(modalities, lambda _: nn.Conv2d(in_channels, out_channels, 1, stride=stride,
                                                                      bias=False), shared=shared)
            self.project_norm = ParallelNorm(modalities, out_channels)

    def forward(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        h = self.norm2(self.conv2(_relu(self.norm1(self.conv1(xs)))))
        skip = self.project_norm(self.project(xs)) if self.project is not None else xs
        return {m: torch.relu(h[m] + skip[m]) for m in h}


class CENStages(nn.Module):
    """All stages of all streams: ``{m: x_m} -> {m: last map}``, or ``{m: [stage maps]}`` (finest first) when
    a dense head needs every scale."""

    def __init__(self, stages: Sequence[nn.Module], *, keep_all: bool) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.keep_all = keep_all

    def forward(self, xs: Mapping[str, Tensor]) -> dict[str, Any]:
        outs: list[dict[str, Tensor]] = []
        h = dict(xs)
        for stage in self.stages:
            h = stage(h)
            outs.append(h)
        if not self.keep_all:
            return h
        return {m: [o[m] for o in outs] for m in h}


class CENEnsemble(nn.Module):
    """Per-modality heads and their learned softmax ensemble (the merge of the ``cen`` model).

    ``modality_logits`` runs each present modality's head; ``combine`` mixes them with ``softmax(alpha)``
    over the present modalities (a missing modality is left out), on detached logits when ``detach``.
    """

    display_name = "ensemble"  # its name in the network figure
    produces_logits = True
    supports_missing = True
    no_weight_decay = ("alpha",)  # ensemble weights: no decay with train.no_decay_norm_bias

    def __init__(self, heads: Mapping[str, nn.Module], *, dense: bool, detach: bool) -> None:
        super().__init__()
        self.modalities = sorted(heads)
        self.heads = nn.ModuleDict(dict(heads))
        self.dense = dense
        self.detach = detach
        self.alpha = nn.Parameter(torch.ones(len(self.modalities)))  # equal weights at the start, as CEN

    def weights(self, present: Sequence[str] | None = None) -> Tensor:
        """The ensemble weights of the present modalities (all by default): a softmax, so they sum to one."""
        idx = [self.modalities.index(m) for m in (present or self.modalities)]
        return self.alpha[idx].softmax(0)

    def modality_logits(self, xs: Mapping[str, Any], size: Sequence[int] | None = None) -> dict[str, Tensor]:
        if self.dense:
            return {m: self.heads[m](xs[m], size=size) for m in self.modalities if m in xs}
        return {m: self.heads[m](xs[m]) for m in self.modalities if m in xs}

    def combine(self, logits: Mapping[str, Tensor]) -> Tensor:
        stacked = torch.stack([v.detach() if self.detach else v for v in logits.values()], dim=0)  # (M, B, K, ...)
        w = self.weights(list(logits)).to(stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
        return (w * stacked).sum(0)


class DenseModalityHead(nn.Module):
    """One modality's dense head: an FPN neck over its stage maps, then per-pixel logits at the input size."""

    dense = True

    def __init__(self, widths: Sequence[int], width: int, num_classes: int, *, dropout: float) -> None:
        super().__init__()
        self.neck = make_neck("fpn", list(widths), width)
        self.head = DenseHead(width, num_classes, dropout=dropout)

    def forward(self, maps: Sequence[Tensor], size: Sequence[int] | None = None) -> Tensor:
        return self.head(self.neck(list(maps)), size=size)


@MODELS.register("cen")
def cen(
    *,
    dims: Mapping[str, int],
    num_classes: int,
    fusion: Mapping[str, Any] | None = None,
    exchange: Mapping[str, Any] | None = None,
    widths: list[int] | None = None,
    blocks: int = 1,
    shared_weights: bool = True,
    exchanging: bool = True,
    threshold: float = 2e-2,
    proximal_l1: float = 0.0,
    detach_ensemble: bool = True,
    neck_width: int | None = None,
    dense: bool = False,
    dropout: float = 0.0,
    modality_heads: bool = True,
) -> MultiStream:
    """CEN: shared conv streams with private BNs, a channel exchange in every block, per-modality heads and a
    learned softmax ensemble.

    Args:
        dims: input channels per modality (the same for all with ``shared_weights``).
        num_classes: classes of the heads.
        fusion: not used (the ensemble is CEN's fusion); accepted so any run config builds.
        exchange: optional ``{name: channel-exchange, threshold: ...}``; its threshold overrides ``threshold``.
        widths: channels of each stage (default [16, 32, 64]); stage s > 0 halves the resolution.
        blocks: basic blocks per stage after the first.
        shared_weights: one set of convolutions for all modalities (CEN); False: private convolutions.
        exchanging: exchange channels (False: the same network and loss, private BNs, nothing exchanged).
        threshold: |BN scale| below which a channel is exchanged (the paper's 2e-2).
        proximal_l1: lambda of the L1 term on the owned BN scales applied as a proximal step after every
            optimiser step (soft threshold by lr x lambda: exact zeros, drift proportional to lambda under any
            optimiser), in every exchange and in the private BNs of ``exchanging: false``; 0 = off (then use
            loss term ``cen-sparsity``). The official loss adds the L1 term once per output, so its balance is
            ``proximal_l1`` = (M + 1) lambda.
        detach_ensemble: the ensemble mixes detached logits (official code), so only ``alpha`` learns from
            the ensemble's loss; the streams then need loss term ``aux-unimodal``.
        neck_width: width of each modality's FPN neck for dense heads (default: the first stage's width).
        dense: per-pixel logits (set by the run for dense tasks).
        dropout: dropout before each head's classifier.
        modality_heads: always true for CEN (accepted because ``aux-unimodal`` sets it).
    """
    widths, modalities = check_streams("cen", dims, widths, blocks, shared_weights)
    exchange = dict(exchange or {})
    name = exchange.pop("name", "channel-exchange")
    if name != "channel-exchange":
        raise ValueError(f"model cen exchanges channels with channel-exchange; exchange.name '{name}' is not supported")
    threshold = exchange.pop("threshold", threshold)
    if exchange:
        raise ValueError(f"exchange option '{min(exchange)}' is not used by model cen; it takes threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"model.threshold must be a number >= 0, got {threshold!r}")
    stages: list[nn.Module] = []
    for s, width in enumerate(widths):
        options = {"shared": bool(shared_weights), "exchanging": bool(exchanging), "threshold": float(threshold),
                   "proximal_l1": check_proximal_l1(proximal_l1, "model cen")}
        if s == 0:
            stages.append(CENStem(modalities, dims, width, **options))
            continue
        stage = [CENBlock(modalities, widths[s - 1], width, stride=2, **options)]
        stage += [CENBlock(modalities, width, width, stride=1, **options) for _ in range(blocks - 1)]
        stages.append(nn.Sequential(*stage))
    heads: dict[str, nn.Module]
    if dense:
        heads = {m: DenseModalityHead(widths, neck_width or widths[0], num_classes, dropout=dropout) for m in modalities}
    else:
        heads = {m: ClassificationHead(widths[-1], num_classes, dropout=dropout) for m in modalities}
    merge = CENEnsemble(heads, dense=dense, detach=bool(detach_ensemble))
    model = MultiStream(
        encoders={m: nn.Identity() for m in modalities},
        exchange=CENStages(stages, keep_all=dense),
        merge=merge,  # type: ignore[arg-type]
    )
    model.required_loss_terms = ("aux-unimodal",) if detach_ensemble else ()  # type: ignore[assignment]
    return model


def fusion_problem(model: Mapping[str, Any], exchange: Mapping[str, Any]) -> str | None:
    """One line when a ``cen`` config exchanges nothing (None when it can): exchanging switched off, or a
    threshold no |BN scale| can fall below."""
    if model.get("exchanging", True) is False:
        return ("model.exchanging=false: CEN then exchanges no channel and each stream sees only its own modality "
                "until the ensemble (the no-exchange ablation)")
    threshold = (exchange or {}).get("threshold", model.get("threshold", 2e-2))
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold <= 0:
        return (f"model.threshold={threshold}: no |BN scale| is below it, so CEN exchanges no channel; use a "
                "threshold above 0 (the paper's 2e-2)")
    return None


cen.fusion_problem = fusion_problem  # type: ignore[attr-defined]  # read by the config check


__all__ = ["CENBlock", "CENEnsemble", "CENStages", "CENStem", "DenseModalityHead", "ParallelConv", "ParallelNorm", "SparseParallelNorm", "cen"]
cen.own_fusion = True  # type: ignore[attr-defined]  # its fusion is built in: the config's fusion section is unused
