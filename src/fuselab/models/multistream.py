"""The one generic multi-stream network: per-modality staged encoders, an optional exchange, an optional
per-modality pooling, a merge at a chosen position, a shared trunk after it, and a head.

Legend: b batch, m modality, s stage, n tokens, d width, k classes.

Order of a forward pass: ``encoders`` (per modality) -> ``exchange`` (``{m: x_m} -> {m: x'_m}``: a standalone
or wrapping Exchange, or ``StreamSequence`` of several) -> ``pool`` (per modality, e.g. class token or mean
over tokens) -> ``merge`` -> ``trunk`` -> ``head``.

``fuse_at``:
- ``"early"``: merge the inputs, then every stage runs once on the fused input (a shared trunk);
- an integer ``k``: merge the stage-k outputs, the remaining stages run as a shared trunk;
- ``"last"`` (default): merge the final stage outputs, then the head.
A merge that produces logits (``late``) replaces the head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from fuselab.fusion.base import Merge
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


class MultiStream(nn.Module):
    """Generic multi-stream model.

    Args:
        encoders: per modality, the stages that run before the merge (identity for early fusion).
        exchange: optional ``{m: x_m} -> {m: x'_m}`` module run on the encoders' outputs (an Exchange,
            standalone or wrapping the streams' later layers, or a ``StreamSequence``).
        pool: optional per-modality module run after the exchange, before the merge (e.g. class-token or mean
            pooling of tokens to a vector).
        merge: a Merge operator over the modalities' outputs at the fusion point.
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
        self.trunk = trunk if trunk is not None else nn.Identity()
        self.head = head
        self.modality_heads = nn.ModuleDict(dict(modality_heads)) if modality_heads else None
        # modules with auxiliary losses, found once (walking the module tree every step costs time)
        self._aux_modules = [(n, m) for n, m in self.named_modules() if m is not self and hasattr(m, "aux_losses")]

    def forward(self, inputs: Mapping[str, Tensor]) -> ModelOutput:
        missing = [m for m in self.modalities if m not in inputs]
        if missing and not self.merge.supports_missing:
            raise ValueError(f"missing modality '{missing[0]}'; the model was built for {self.modalities}")
        streams = {m: self.encoders[m](inputs[m]) for m in self.modalities if m in inputs}
        if self.exchange is not None:
            streams = self.exchange(streams)
        if self.pool is not None:
            streams = {m: self.pool[m](z) for m, z in streams.items()}
        modality_logits = None
        if self.modality_heads is not None:
            modality_logits = {m: self.modality_heads[m](z) for m, z in streams.items()}
        if self.merge.produces_logits:
            per_modality = self.merge.modality_logits(streams)
            logits = self.merge.combine(per_modality)
            features = None
            modality_logits = per_modality if modality_logits is None else modality_logits
        else:
            features = self.trunk(self.merge(streams))
            logits = self.head(features)
        return ModelOutput(logits=logits, modality_logits=modality_logits, features=features, aux_losses=self.collect_aux())

    def collect_aux(self) -> dict[str, Tensor]:
        """Auxiliary losses of every submodule that defines ``aux_losses()``, keyed by module path."""
        out: dict[str, Tensor] = {}
        for name, module in self._aux_modules:
            for key, value in module.aux_losses().items():
                out[f"{name}.{key}"] = value
        return out
