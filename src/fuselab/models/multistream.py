"""The one generic multi-stream network: per-modality staged encoders, an optional exchange, an optional
per-modality pooling, a merge at a chosen position, a shared trunk after it, and a head.

Legend: b batch, m modality, s stage, n tokens, d width, k classes.

Order of a forward pass: ``encoders`` (per modality) -> ``exchange`` (``{m: x_m} -> {m: x'_m}``: a standalone
or wrapping Exchange, or ``StreamSequence`` of several) -> ``pool`` (per modality, e.g. class token or mean
over tokens) -> ``merge`` -> ``trunk`` -> ``head``.

``fuse_at``:
- ``"early"``: merge the inputs, then every stage runs once on the fused input (a shared trunk);
- an integer ``k``: merge the stage-k outputs, the remaining stages run as a shared trunk;
- ``"last"`` (default): merge the final stage outputs, then the head;
- a list of stages or ``"all"``: multi-scale; the streams continue separately, a merge at each listed stage
  (``MultiScaleMerge``), and a ``neck`` aggregates the fused maps for the head.
A merge that produces logits (``late``) replaces the head. A head with ``dense = True`` is given the input's
spatial size, so that its per-pixel logits match the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fuselab.data.corruptions import keep_masks
from fuselab.fusion.base import FusionBase, Merge, check_dims
from fuselab.models.output import ModelOutput


def resolve_fuse_at(fuse_at: str | int, n_stages: int) -> int:
    """Stage index after which the merge happens: -1 for early, n_stages - 1 for last."""
    if fuse_at == "early":
        return -1
    if fuse_at == "last":
        return n_stages - 1
    if isinstance(fuse_at, str) and fuse_at.lstrip("-").isdigit():
        fuse_at = int(fuse_at)
    if isinstance(fuse_at, int) and not isinstance(fuse_at, bool) and 0 <= fuse_at < n_stages:
        return fuse_at
    raise ValueError(
        f"model.fuse_at must be 'early', 'last' or a stage index 0..{n_stages - 1}, got {fuse_at!r}"
    )


def resolve_fuse_stages(fuse_at: str | int | Sequence[int], n_stages: int) -> list[int] | None:
    """The stages merged by a multi-scale fusion (sorted), or None where ``fuse_at`` names a single point."""
    if fuse_at == "all":
        return list(range(n_stages))
    if isinstance(fuse_at, (str, int)):
        return None
    stages = list(fuse_at)
    if not stages or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < n_stages for s in stages):
        raise ValueError(f"model.fuse_at as a list must hold stage indices 0..{n_stages - 1}, got {stages}")
    if len(set(stages)) != len(stages):
        raise ValueError(f"model.fuse_at lists a stage twice: {stages}")
    return sorted(stages)


class PerModality(nn.Module):
    """Run each modality's own module on its stream: ``{m: x_m} -> {m: f_m(x_m)}`` (the streams stay apart)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.streams = nn.ModuleDict(dict(modules))

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.streams[m](x) for m, x in inputs.items()}


class StreamSequence(nn.Module):
    """Several dict -> dict steps (exchanges, ``PerModality``) one after another."""

    def __init__(self, steps: Sequence[nn.Module]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        xs = dict(inputs)
        for step in self.steps:
            xs = step(xs)
        return xs


class MultiScaleMerge(nn.Module):
    """Merges at several stages: runs the streams' stages one after another (each a ``{m: x_m} -> {m: x'_m}``
    step, exchanges included) and merges the outputs of the listed stages, each with its own Merge.

    Returns the fused maps of the listed stages, earliest (finest) first, for a neck.
    """

    produces_logits = False
    supports_missing = False

    def __init__(self, steps: Sequence[nn.Module], merges: Mapping[int, Merge]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps[: max(merges) + 1])
        self.merges = nn.ModuleDict({str(s): merges[s] for s in sorted(merges)})
        self.out_dims = [merges[s].out_dim for s in sorted(merges)]

    def forward(self, inputs: Mapping[str, Tensor]) -> list[Tensor]:
        xs, fused = dict(inputs), []
        for s, step in enumerate(self.steps):
            xs = step(xs)
            if str(s) in self.merges:
                fused.append(self.merges[str(s)](xs))
        return fused


class MultiStream(nn.Module):
    """Generic multi-stream model.

    Args:
        encoders: per modality, the stages that run before the merge (identity for early fusion).
        exchange: optional ``{m: x_m} -> {m: x'_m}`` module run on the encoders' outputs (an Exchange,
            standalone or wrapping the streams' later layers, or a ``StreamSequence``).
        pool: optional per-modality module run after the exchange, before the merge (e.g. class-token or mean
            pooling of tokens to a vector).
        merge: a Merge operator over the modalities' outputs at the fusion point (or a ``MultiScaleMerge``).
        neck: optional module between the merge and the trunk (``fuselab.models.necks``: FPN, ASPP, PPM).
        trunk: the stages that run on the fused features (empty when fusing at the last stage).
        head: maps the fused (trunk) features to logits; None when the merge produces logits.
        modality_heads: optional per-modality heads on each stream's fusion-point output (for the
            ``aux-unimodal`` loss term).
    """

    def __init__(
        self,
        *,
        encoders: Mapping[str, nn.Module],
        merge: Merge,
        trunk: nn.Module | None = None,
        head: nn.Module | None = None,
        modality_heads: Mapping[str, nn.Module] | None = None,
        exchange: nn.Module | None = None,
        pool: Mapping[str, nn.Module] | None = None,
        neck: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if merge.produces_logits and head is not None:
            raise ValueError("a merge that produces logits (late) takes no head of its own")
        if head is None and not merge.produces_logits:
            raise ValueError("MultiStream needs a head unless the merge produces logits")
        self.modalities = sorted(encoders)
        self.encoders = nn.ModuleDict(dict(encoders))
        self.exchange = exchange
        self.pool = nn.ModuleDict(dict(pool)) if pool else None
        self.merge = merge
        self.neck = neck
        self.trunk = trunk if trunk is not None else nn.Identity()
        self.head = head
        self.modality_heads = nn.ModuleDict(dict(modality_heads)) if modality_heads else None
        # modules with auxiliary losses, found once (walking the module tree every step costs time)
        self._aux_modules = [
            (n, m) for n, m in self.named_modules()
            if m is not self and hasattr(m, "aux_losses") and getattr(type(m), "aux_losses", None) is not FusionBase.aux_losses
        ]  # only modules that define their own aux_losses (the base one returns nothing)

    def forward(self, inputs: Mapping[str, Tensor], keep: Mapping[str, Tensor] | None = None) -> ModelOutput:
        """Run the network. ``keep`` (modality dropout, ``train.modality_dropout``): per modality a (B,) mask
        of 1 (keep) and 0 (drop); a dropped sample's stream is set to zero at the encoder's output and again
        at the fusion point, so nothing of it reaches the merge and its encoder gets no gradient from it."""
        missing = [m for m in self.modalities if m not in inputs]
        if missing and not self.merge.supports_missing:
            raise ValueError(f"missing modality '{missing[0]}'; the model was built for {self.modalities}")
        streams = {m: self.encoders[m](inputs[m]) for m in self.modalities if m in inputs}
        if keep:
            streams = _mask_streams(streams, keep)
        if self.exchange is not None:
            if keep and getattr(self.exchange, "takes_keep", False):  # e.g. MBT: a dropped copy leaves the mean
                streams = self.exchange(streams, keep=keep)
            else:
                streams = self.exchange(streams)
        if self.pool is not None:
            streams = {m: self.pool[m](z) for m, z in streams.items()}
        if keep:
            streams = _mask_streams(streams, keep)
        modality_logits = None
        if self.modality_heads is not None:
            modality_logits = {m: self.modality_heads[m](z) for m, z in streams.items()}
        if self.merge.produces_logits:
            if getattr(self.merge, "dense", False):  # per-modality dense heads need the input's size
                per_modality = self.merge.modality_logits(streams, size=next(iter(inputs.values())).shape[-2:])
            else:
                per_modality = self.merge.modality_logits(streams)
            logits = self.merge.combine(per_modality)
            features = None
            modality_logits = per_modality if modality_logits is None else modality_logits
        else:
            fused = self.merge(streams)
            features = self.trunk(self.neck(fused) if self.neck is not None else fused)
            if getattr(self.head, "dense", False):  # per-pixel logits at the input's size
                logits = self.head(features, size=next(iter(inputs.values())).shape[-2:])
            else:
                logits = self.head(features)
        return ModelOutput(logits=logits, modality_logits=modality_logits, features=features, aux_losses=self.collect_aux())

    def modality_dropout(self, inputs: Mapping[str, Tensor], rates: Mapping[str, float],
                         generator: torch.Generator | None = None) -> tuple[Mapping[str, Tensor], dict[str, Any]]:
        """Modality dropout of one training batch (``train.modality_dropout``; the training loop calls it
        through ``fuselab.data.corruptions.apply_modality_dropout``): the inputs stay as they are, and per
        modality with a rate above 0 a (B,) ``keep`` mask is drawn (``keep_masks``) for ``forward``, which
        zeroes the dropped streams at the encoders' outputs, so a dropped encoder gets no gradient.

        Returns ``(inputs, {"keep": masks})``, the inputs and the extra keyword arguments of ``forward``.
        """
        first = next(iter(inputs.values()))
        return inputs, {"keep": keep_masks(len(first), rates, generator, device=first.device)}

    def training_stats(self) -> dict[str, float]:
        """The ``epoch_stats`` of every submodule that has them (e.g. the share of exchanged channels of each
        channel exchange), keyed ``<module path>.<stat>``; the training loop adds them to each epoch's row."""
        return {f"{name}.{k}": v for name, module in self.named_modules() if module is not self
                and callable(getattr(module, "epoch_stats", None)) for k, v in module.epoch_stats().items()}

    def collect_aux(self) -> dict[str, Tensor]:
        """Auxiliary losses of every submodule that defines ``aux_losses()``, keyed by module path."""
        out: dict[str, Tensor] = {}
        for name, module in self._aux_modules:
            for key, value in module.aux_losses().items():
                out[f"{name}.{key}"] = value
        return out


def _mask_streams(streams: Mapping[str, Tensor], keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Multiply each listed stream by its per-sample keep mask (broadcast over the feature axes)."""
    def apply(z: Tensor | Sequence[Tensor], mask: Tensor) -> Tensor | list[Tensor]:
        if isinstance(z, (list, tuple)):  # a stream of several stage maps
            return [apply(v, mask) for v in z]  # type: ignore[misc]
        return z * mask.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))

    out = dict(streams)
    for m, mask in keep.items():
        if m in out:
            out[m] = apply(out[m], mask)
    return out


class SingleStream(Merge):
    """The merge of a one-modality model (a unimodal baseline): the only stream passes through, nothing is
    fused. Builders use it when the data has one modality; the ``fusion`` and ``exchange`` sections are then
    ignored, so one spec can hold unimodal and fused methods (``data.modalities: [image]``)."""

    forms = ("vector", "tokens", "map")
    multimodal_rule = "exactly one modality: no fusion"
    natural_out_dim = "the width of the stream"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        nn.Module.__init__(self)
        self.dims = check_dims(dims, "SingleStream", minimum=1)
        if len(self.dims) != 1:
            raise ValueError(f"SingleStream takes exactly one modality, got {sorted(self.dims)}")
        self.modalities = sorted(self.dims)
        self.out_dim = next(iter(self.dims.values()))

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        return xs[self.modalities[0]]
