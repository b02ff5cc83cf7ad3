"""``conv-streams``: per-modality ResNet-style staged conv encoders in the generic MultiStream, for maps.

Legend: b batch, m modality, s stage, c channels, h height, w width, k classes.

Stage 0 keeps the input resolution (a 3x3 stem conv, then ``stem_blocks`` basic blocks, none by default: full
resolution is where convolutions cost most); every later stage halves it (a basic block with stride 2, then
``blocks - 1`` more). ``widths`` gives the channels of each stage.

- ``shared_weights``: one encoder for all modalities (Siamese; FC-Siam, CEN), run in **one batched pass**
  over the modalities stacked on the batch axis (``SharedStage``), not a loop over them; the modalities must
  then have the same number of channels.
- ``exchange``: a standalone Exchange (``rectify``, ``spatial-exchange``, ``channel-exchange-p``, ...) after
  every stage the streams run separately.
- ``fuse_at``: ``early`` (merge the inputs), a stage index or ``last`` (one merge, the later stages as a shared
  trunk), or a list of stages / ``all`` (a merge at each listed stage and a ``neck``: fpn, aspp, ppm).
- ``dense``: per-pixel logits (``DenseHead``, upsampled to the input size) instead of a pooled classifier; the
  run sets it from the dataset's task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import fuselab.api as api
from fuselab.models.heads import ClassificationHead, DenseHead
from fuselab.models.merging import MergeAndHead, merge_and_head
from fuselab.models.multistream import (
    MultiScaleMerge,
    MultiStream,
    PerModality,
    StreamSequence,
    resolve_fuse_at,
    resolve_fuse_stages,
)
from fuselab.models.necks import make_neck
from fuselab.registry import MODELS

DEFAULT_WIDTHS = [16, 32, 64]  # channels of the stages when model.widths is not given


class BasicBlock(nn.Module):
    """ResNet's basic block: Conv3x3-BN-ReLU-Conv3x3-BN plus the (projected) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def conv_stage(index: int, in_channels: int, out_channels: int, *, blocks: int, stem_blocks: int = 0) -> nn.Sequential:
    """Stage ``index``: full resolution with a stem conv for stage 0, stride 2 for every later stage."""
    if index == 0:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(stem_blocks)]
    else:
        layers = [BasicBlock(in_channels, out_channels, stride=2)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ConvEncoder(nn.Module):
    """A small ResNet-style encoder of one modality to a vector, for ``custom-streams`` (import path
    ``fuselab.models.conv.ConvEncoder``): the ``conv-streams`` stages, then global average pooling.
    A 2-D input per sample (a spectrogram (T, F)) is read as one channel.

    Args:
        in_channels: input channels (1 for a grey image or a spectrogram).
        widths: channels of each stage; stage s > 0 halves the resolution.
        blocks: basic blocks per stage after the first.
    """

    def __init__(self, in_channels: int = 1, widths: list[int] | None = None, blocks: int = 1) -> None:
        super().__init__()
        widths = _positive_ints(widths if widths is not None else DEFAULT_WIDTHS, "widths")
        self.stages = nn.Sequential(*[
            conv_stage(s, in_channels if s == 0 else widths[s - 1], w, blocks=blocks) for s, w in enumerate(widths)
        ])
        self.out_dim = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # (B, T, F): one channel
            x = x.unsqueeze(1)
        return self.stages(x).mean((-2, -1))


class SharedStage(nn.Module):
    """One module for all modalities, in one batched pass: ``{m: (B, C, H, W)}`` are stacked to (M B, C, H, W),
    run once, and split back (sorted modality order)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        names = sorted(inputs)
        out = self.module(torch.cat([inputs[m] for m in names], dim=0))
        return dict(zip(names, out.chunk(len(names), dim=0)))


class LoopedStage(nn.Module):
    """The same shared module run once per modality (a Python loop): only for timing against ``SharedStage``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.module(inputs[m]) for m in sorted(inputs)}


def _positive_ints(values: Any, key: str) -> list[int]:
    values = list(values) if isinstance(values, (list, tuple)) else values
    if not isinstance(values, list) or not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"model.{key} must be a non-empty list of positive integers, got {values!r}")
    return values


def check_streams(builder: str, dims: Mapping[str, int], widths: list[int] | None, blocks: int,
                  shared_weights: bool) -> tuple[list[int], list[str]]:
    """The options every staged conv builder checks: stage widths (default [16, 32, 64]), blocks, at least two
    modalities, and equal input channels for shared weights. Returns the widths and the sorted modalities."""
    widths = _positive_ints(widths if widths is not None else DEFAULT_WIDTHS, "widths")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"model.blocks must be a positive integer, got {blocks!r}")
    if len(dims) < 2:
        raise ValueError(f"{builder} needs at least 2 modalities, got {len(dims)}")
    modalities = sorted(dims)
    if shared_weights and len({dims[m] for m in modalities}) != 1:
        raise ValueError(f"model.shared_weights needs the same channels in every modality, got {dict(dims)}")
    return widths, modalities


def _standalone_exchange(exchange: Mapping[str, Any] | None, at: int | None) -> tuple[str | None, dict[str, Any]]:
    """The ``exchange`` option's operator name (None for none) and options, checked: a standalone map
    exchange, on streams that run apart."""
    options = dict(exchange or {})
    name = options.pop("name", None)
    if name is not None:
        info = api.fusion_info(name)
        if info.contract != "exchange" or info.kind != "standalone" or "map" not in info.forms:
            raise ValueError(f"exchange '{name}' is not a standalone map exchange (e.g. rectify)")
        if at == -1:
            raise ValueError("an exchange needs separate streams; it cannot be used with model.fuse_at=early")
    return name, options


def _separate_stages(dims: Mapping[str, int], widths: list[int], separate: int, *, blocks: int, stem_blocks: int,
                     shared_weights: bool, batched: bool, exchange: tuple[str | None, dict[str, Any]]) -> list[nn.Module]:
    """The stages the streams run apart, each a ``{m: x_m} -> {m: x'_m}`` step (shared or per modality),
    followed by the standalone exchange where there is one."""
    modalities = sorted(dims)
    exchange_name, options = exchange
    steps: list[nn.Module] = []
    for s in range(separate):
        if shared_weights:
            stage = conv_stage(s, dims[modalities[0]] if s == 0 else widths[s - 1], widths[s], blocks=blocks, stem_blocks=stem_blocks)
            steps.append(SharedStage(stage) if batched else LoopedStage(stage))
        else:
            steps.append(PerModality({
                m: conv_stage(s, dims[m] if s == 0 else widths[s - 1], widths[s], blocks=blocks, stem_blocks=stem_blocks) for m in modalities
            }))
        if exchange_name is not None:
            steps[-1] = StreamSequence([steps[-1], api.create_fusion(exchange_name, dims={m: widths[s] for m in modalities}, **options)])
    return steps


def _multi_scale(point: MergeAndHead, steps: list[nn.Module], modalities: list[str], widths: list[int],
                 fuse_stages: list[int], *, neck: str | None, neck_width: int | None, rates: list[int], bins: list[int]
                 ) -> tuple[nn.Module, None, nn.Module, int]:
    """Merges at several stages and the neck over them: (merge, no trunk, neck, width of the neck)."""
    merges = {s: point.merge({m: widths[s] for m in modalities}) for s in fuse_stages}
    width = neck_width or widths[0]
    head_neck = make_neck(neck or "fpn", [merges[s].out_dim for s in fuse_stages], width, rates=rates, bins=bins)
    return MultiScaleMerge(steps, merges), None, head_neck, width


def _single_point(point: MergeAndHead, dims: Mapping[str, int], widths: list[int], at: int, *, blocks: int,
                  stem_blocks: int, neck: str | None, neck_width: int | None, rates: list[int], bins: list[int]
                  ) -> tuple[nn.Module, nn.Module | None, nn.Module | None, int]:
    """One merge after stage ``at`` (-1: the inputs), the shared trunk of the later stages and an optional neck:
    (merge, trunk, neck, width of what the head reads)."""
    modalities = sorted(dims)
    merge = point.merge(dict(dims) if at == -1 else {m: widths[at] for m in modalities})
    trunk_stages = [
        conv_stage(s, merge.out_dim if s == at + 1 else widths[s - 1], widths[s], blocks=blocks, stem_blocks=stem_blocks)
        for s in range(at + 1, len(widths))
    ]
    trunk: nn.Module | None = nn.Sequential(*trunk_stages) if trunk_stages else None
    fused_width = widths[-1] if trunk_stages else merge.out_dim
    head_neck = None
    if neck is not None:
        width = neck_width or widths[0]
        head_neck = make_neck(neck, [fused_width], width, rates=rates, bins=bins)
        # the neck runs before the trunk in MultiStream; with a trunk, put it after the trunk instead
        if trunk is not None:
            trunk, head_neck = nn.Sequential(trunk, head_neck), None
        fused_width = width
    return merge, trunk, head_neck, fused_width


@MODELS.register("conv-streams")
def conv_streams(
    *,
    dims: Mapping[str, int],
    num_classes: int,
    fusion: Mapping[str, Any],
    exchange: Mapping[str, Any] | None = None,
    widths: list[int] | None = None,
    blocks: int = 1,
    stem_blocks: int = 0,
    shared_weights: bool = False,
    fuse_at: Any = "last",
    neck: str | None = None,
    neck_width: int | None = None,
    rates: list[int] | None = None,
    bins: list[int] | None = None,
    dense: bool = False,
    dropout: float = 0.0,
    modality_heads: bool = False,
    batched: bool = True,
) -> MultiStream:
    """Conv streams, a merge at one or several stages, an optional neck and a classification or dense head.

    Args:
        dims: input channels per modality.
        num_classes: classes of the head.
        fusion: the merge's config (``name`` and its options); the same operator at every fused stage.
        exchange: an optional standalone map Exchange (``name`` and options) after every separate stage.
        widths: channels of each stage (default [16, 32, 64]); stage s > 0 halves the resolution.
        blocks: basic blocks per stage after the first.
        stem_blocks: basic blocks after the stem conv in stage 0 (full resolution).
        shared_weights: one encoder for all modalities, run in one batched pass (same channels needed).
        fuse_at: ``early``, a stage index, ``last``, a list of stage indices or ``all``.
        neck: ``fpn``, ``aspp``, ``ppm`` or ``concat``; None: no neck for one fused stage, ``fpn`` for several.
        neck_width: the neck's output channels (default: the first stage's width).
        rates: ASPP dilation rates (default [6, 12, 18], DeepLabv3 at output stride 16).
        bins: PPM pooled sizes (default [1, 2, 3, 6], PSPNet).
        dense: per-pixel logits (set by the run for dense tasks).
        dropout: dropout before the classifier of the head.
        modality_heads: a head per stream on its fusion-point output (single-point fusion only).
        batched: with ``shared_weights``, stack the modalities into one pass (default); False runs the shared
            encoder once per modality (only to measure what batching saves).
    """
    widths, modalities = check_streams("conv-streams", dims, widths, blocks, shared_weights)
    rates = _positive_ints(rates if rates is not None else [6, 12, 18], "rates")
    bins = _positive_ints(bins if bins is not None else [1, 2, 3, 6], "bins")
    if isinstance(stem_blocks, bool) or not isinstance(stem_blocks, int) or stem_blocks < 0:
        raise ValueError(f"model.stem_blocks must be a non-negative integer, got {stem_blocks!r}")
    n_stages = len(widths)
    fuse_stages = resolve_fuse_stages(fuse_at, n_stages)
    at = None if fuse_stages is not None else resolve_fuse_at(fuse_at, n_stages)
    point = merge_and_head(fusion, num_classes=num_classes,
                           logits_error="fusion '{name}' merges logits; conv-streams takes a feature merge")
    exchange_name, exchange = _standalone_exchange(exchange, at)
    separate = max(fuse_stages) + 1 if fuse_stages is not None else at + 1  # stages the streams run apart
    steps = _separate_stages(dims, widths, separate, blocks=blocks, stem_blocks=stem_blocks, shared_weights=shared_weights,
                             batched=batched, exchange=(exchange_name, exchange))
    identity = {m: nn.Identity() for m in modalities}
    necks = {"neck": neck, "neck_width": neck_width, "rates": rates, "bins": bins}
    if fuse_stages is not None:
        if modality_heads:
            raise ValueError("model.modality_heads needs a single fusion point, not a list of stages")
        merge, trunk, head_neck, fused_width = _multi_scale(point, steps, modalities, widths, fuse_stages, **necks)
    else:
        merge, trunk, head_neck, fused_width = _single_point(point, dims, widths, at, blocks=blocks, stem_blocks=stem_blocks,
                                                             **necks)
    head = point.head(fused_width, make=lambda width: DenseHead(width, num_classes, dropout=dropout) if dense
                      else ClassificationHead(width, num_classes, dropout=dropout))
    heads = None
    if modality_heads and at is not None and at >= 0:
        heads = {m: ClassificationHead(widths[at], num_classes) for m in modalities}
    return MultiStream(
        encoders=identity,
        exchange=StreamSequence(steps) if fuse_stages is None and steps else None,
        merge=merge,
        trunk=trunk,
        neck=head_neck,
        head=head,
        modality_heads=heads,
    )


def check_config(model: Mapping[str, Any]) -> None:
    """At config time: ``model.fuse_at`` names stages the streams have (a ValueError with the one line)."""
    widths = model.get("widths") or DEFAULT_WIDTHS
    if isinstance(widths, list) and widths:
        if resolve_fuse_stages(model.get("fuse_at", "last"), len(widths)) is None:
            resolve_fuse_at(model.get("fuse_at", "last"), len(widths))


conv_streams.check_config = check_config  # type: ignore[attr-defined]  # read by the config check


__all__ = ["BasicBlock", "ConvEncoder", "LoopedStage", "check_streams", "SharedStage", "conv_stage", "conv_streams"]
