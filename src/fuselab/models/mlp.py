"""``mlp-streams``: per-modality MLP encoders in the generic MultiStream, for vector modalities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fuselab.models.merging import merge_and_head
from fuselab.models.multistream import MultiStream, resolve_fuse_at
from fuselab.registry import MODELS

NORMS = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d, "none": None}


def mlp_stage(in_dim: int, out_dim: int, *, norm: str, dropout: float) -> nn.Sequential:
    """Linear -> norm -> ReLU -> dropout."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    if NORMS[norm] is not None:
        layers.append(NORMS[norm](out_dim))
    layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


@MODELS.register("mlp-streams")
def mlp_streams(
    *,
    dims: Mapping[str, int],
    num_classes: int,
    fusion: Mapping[str, Any],
    hidden: int = 128,
    layers: int = 2,
    dropout: float = 0.2,
    norm: str = "layer",
    fuse_at: str | int = "last",
    modality_heads: bool = False,
) -> MultiStream:
    """Per-modality MLPs of ``layers`` stages of width ``hidden``; the merge at ``fuse_at``; a linear head.

    Args:
        dims: input width per modality.
        num_classes: number of classes of the head.
        fusion: the merge's config (``name`` and its options).
        hidden: width of every stage.
        layers: number of stages per stream (stages after the fusion point form the shared trunk).
        dropout: dropout after each stage and before the head.
        norm: ``layer``, ``batch`` or ``none`` after each Linear.
        fuse_at: ``early``, ``last`` or the index of the stage whose outputs are merged.
        modality_heads: add a linear head per stream (needed by the ``aux-unimodal`` loss term).
    """
    if norm not in NORMS:
        raise ValueError(f"model.norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if layers < 1:
        raise ValueError(f"model.layers must be at least 1, got {layers}")
    at = resolve_fuse_at(fuse_at, layers)
    # one modality is a unimodal baseline: no merge, the fusion section is ignored
    point = merge_and_head(fusion, num_classes=num_classes, unimodal=len(dims) == 1,
                           logits_error=None if at == layers - 1 else "fusion '{name}' merges logits; use it with model.fuse_at=last")
    encoders: dict[str, nn.Module] = {}
    stream_dims: dict[str, int] = {}
    for m, d in dims.items():
        stages = [mlp_stage(d if s == 0 else hidden, hidden, norm=norm, dropout=dropout) for s in range(at + 1)]
        encoders[m] = nn.Sequential(*stages) if stages else nn.Identity()
        stream_dims[m] = hidden if stages else d
    merge = point.merge(stream_dims)
    trunk_stages = [
        mlp_stage(merge.out_dim if s == at + 1 else hidden, hidden, norm=norm, dropout=dropout)
        for s in range(at + 1, layers)
    ]
    fused_width = hidden if trunk_stages else merge.out_dim
    head = point.head(fused_width, dropout=dropout)
    heads = {m: nn.Linear(w, num_classes) for m, w in stream_dims.items()} if modality_heads else None
    return MultiStream(
        encoders=encoders,
        merge=merge,
        trunk=nn.Sequential(*trunk_stages) if trunk_stages else None,
        head=head,
        modality_heads=heads,
    )


def check_config(model: Mapping[str, Any]) -> None:
    """At config time: ``model.fuse_at`` names a stage the streams have (a ValueError with the one line)."""
    layers = model.get("layers", 2)
    if isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1:
        resolve_fuse_at(model.get("fuse_at", "last"), layers)


mlp_streams.check_config = check_config  # type: ignore[attr-defined]  # read by the config check
