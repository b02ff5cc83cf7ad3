"""The fusion contracts: Merge and Exchange (standalone and wrapping).

Legend: b batch, m modality, n tokens, d width, c channels, h height, w width of a map.

Modality-keyed inputs are a ``Mapping[str, Tensor]``. Operators walk modalities in sorted key order (or
in the ``order`` option of an asymmetric operator), so a result never depends on dict order. Three input
forms: vectors ``(B, D)``, tokens ``(B, N, D)`` and maps ``(B, C, H, W)``; the feature axis is the last
one for vectors and tokens and axis 1 for maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

FORM_RANK = {"vector": 2, "tokens": 3, "map": 4}
FORM_SHAPE = {"vector": "(B, D)", "tokens": "(B, N, D)", "map": "(B, C, H, W)"}


@dataclasses.dataclass(frozen=True)
class FusionInfo:
    """What a fusion operator is, as ``fuselab.fusion_info(id)`` reports it."""

    id: str
    contract: str  # "merge" | "exchange"
    kind: str  # "merge" | "standalone" | "wrapping"
    forms: tuple[str, ...]  # accepted input forms: "vector", "tokens", "map"
    multimodal_rule: str  # how the operator treats more than two modalities
    supports_missing: bool  # may a modality be absent from the input at forward time
    natural_out_dim: str  # the output width when out_dim is None
    paper: str
    reference: str  # the public implementation whose behaviour it matches
    formula: str
    asymmetric: bool  # does it take an ``order`` / ``target`` option
    produces_logits: bool
    options: dict  # constructor options beyond dims/out_dim, with their defaults

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def feature_axis(x: Tensor) -> int:
    """Channel axis of a map, last axis of vectors and tokens."""
    return 1 if x.dim() == 4 else -1


class ChannelLinear(nn.Linear):
    """A Linear layer on the feature axis of any form (a 1x1 convolution on maps)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:  # (B, C, H, W) -> (B, H, W, C) -> back
            return super().forward(x.movedim(1, -1)).movedim(-1, 1)
        return super().forward(x)


def check_dims(dims: Mapping[str, int], where: str, *, minimum: int = 2) -> dict[str, int]:
    """Validate a modality -> width mapping at construction."""
    if not isinstance(dims, Mapping):
        raise ValueError(f"{where}: dims must be a mapping of modality name -> width, got {type(dims).__name__}")
    if len(dims) < minimum:
        raise ValueError(
            f"{where}: needs at least {minimum} modalities, got {len(dims)} ({', '.join(map(str, dims)) or 'none'})"
        )
    out = {}
    for name, width in dims.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: modality names must be non-empty strings, got {name!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"{where}: modality '{name}' needs a positive integer width, got {width!r}")
        out[name] = int(width)
    return out


def resolve_order(names: Sequence[str], order: Sequence[str] | None, where: str) -> list[str]:
    """The modality order of an asymmetric operator: ``order`` (a permutation of the names) or sorted."""
    if order is None:
        return sorted(names)
    order = list(order)
    if sorted(order) != sorted(names):
        raise ValueError(
            f"{where}: order {order} must list each modality exactly once; modalities are {sorted(names)}"
        )
    return order


def _shape(x: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


class FusionBase(nn.Module):
    """What every fusion operator declares about itself (read by ``fusion_info``)."""

    contract: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    forms: ClassVar[tuple[str, ...]] = ("vector",)
    supports_missing: ClassVar[bool] = False
    produces_logits: ClassVar[bool] = False
    asymmetric: ClassVar[bool] = False
    same_size: ClassVar[bool] = True  # all modalities share every axis but the feature axis
    multimodal_rule: ClassVar[str] = ""
    natural_out_dim: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    formula: ClassVar[str] = ""

    modalities: list[str]
    dims: dict[str, int]

    def aux_losses(self) -> dict[str, Tensor]:
        """Auxiliary loss terms of this operator (e.g. a sparsity penalty); none by default."""
        return {}

    @classmethod
    def fusion_problem(cls, options: Mapping[str, Any]) -> str | None:
        """One line when these config options leave the operator unable to carry information between
        modalities (checked before anything trains); None when they can. Operators with such settings
        override it."""
        return None

    def check_inputs(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Validate modality keys, ranks and widths; return the inputs in the operator's order."""
        where = type(self).__name__
        if not isinstance(inputs, Mapping):
            raise ValueError(f"{where}: expected a mapping of modality name -> tensor, got {type(inputs).__name__}")
        extra = sorted(set(inputs) - set(self.modalities))
        if extra:
            raise ValueError(f"{where}: unexpected modality '{extra[0]}'; it was built for {self.modalities}")
        present = [m for m in self.modalities if m in inputs]
        missing = [m for m in self.modalities if m not in inputs]
        if missing and not (self.supports_missing and present):
            raise ValueError(f"{where}: missing modality '{missing[0]}'; expected keys {self.modalities}")
        ranks = {FORM_RANK[f]: f for f in self.forms}
        first = None
        for m in present:
            x = inputs[m]
            if not isinstance(x, Tensor):
                raise ValueError(f"{where}: modality '{m}' must be a tensor, got {type(x).__name__}")
            if x.dim() not in ranks:
                wanted = " or ".join(f"{f} {FORM_SHAPE[f]}" for f in self.forms)
                raise ValueError(f"{where}: modality '{m}' must be {wanted}, got shape {_shape(x)}")
            axis = feature_axis(x)
            if x.shape[axis] != self.dims[m]:
                raise ValueError(
                    f"{where}: modality '{m}' must have width {self.dims[m]} on axis {axis % x.dim()}, "
                    f"got shape {_shape(x)}"
                )
            if first is None:
                first = m
                continue
            y = inputs[first]
            if x.dim() != y.dim() or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{where}: modality '{m}' has shape {_shape(x)} but '{first}' has {_shape(y)}; "
                    "all modalities need the same form and batch size"
                )
            if self.same_size:
                sx = [s for i, s in enumerate(x.shape) if i != axis % x.dim()]
                sy = [s for i, s in enumerate(y.shape) if i != axis % y.dim()]
                if sx != sy:
                    what = "spatial size" if x.dim() == 4 else "token count"
                    raise ValueError(
                        f"{where}: modality '{m}' has shape {_shape(x)} but '{first}' has {_shape(y)}; "
                        f"the {what} must match"
                    )
        return {m: inputs[m] for m in present}


class Merge(FusionBase):
    """Merge contract: ``{m: x_m} -> z``.

    Args:
        dims: width of each modality (channels for maps).
        out_dim: output width; ``None`` is the operator's natural width (its ``natural_out_dim``).

    After construction ``self.out_dim`` holds the resolved output width.
    """

    contract = "merge"
    kind = "merge"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__()
        where = type(self).__name__
        self.dims = check_dims(dims, where)
        self.modalities = sorted(self.dims)
        if out_dim is not None and (isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1):
            raise ValueError(f"{where}: out_dim must be a positive integer or None, got {out_dim!r}")
        self.out_dim = out_dim

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.merge(self.check_inputs(inputs))

    def merge(self, xs: dict[str, Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Exchange(FusionBase):
    """Standalone exchange contract: ``{m: x_m} -> {m: x'_m}``, same shapes, streams stay separate.

    Args:
        dims: width of each modality (channels for maps).
    """

    contract = "exchange"
    kind = "standalone"

    def __init__(self, dims: Mapping[str, int]) -> None:
        super().__init__()
        self.dims = check_dims(dims, type(self).__name__)
        self.modalities = sorted(self.dims)

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        xs = self.check_inputs(inputs)
        out = self.exchange(xs)
        for m, x in xs.items():
            if out[m].shape != x.shape:  # a contract violation of the operator itself
                raise RuntimeError(f"{type(self).__name__} changed the shape of '{m}'")
        return out

    def exchange(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class WrappingExchange(FusionBase):
    """Wrapping exchange contract: runs the streams' own layers with a cross-modal step between or inside them.

    Args:
        layers: per modality, the sequence of layers this operator spans (the same count for each).
    """

    contract = "exchange"
    kind = "wrapping"
    forms = ("tokens",)

    def __init__(self, layers: Mapping[str, Sequence[nn.Module]]) -> None:
        super().__init__()
        where = type(self).__name__
        if not isinstance(layers, Mapping) or len(layers) < 2:
            n = len(layers) if isinstance(layers, Mapping) else 0
            raise ValueError(f"{where}: needs the layers of at least 2 modalities, got {n}")
        counts = {m: len(seq) for m, seq in layers.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"{where}: every modality needs the same number of layers, got {counts}")
        self.modalities = sorted(layers)
        self.layers = nn.ModuleDict({m: nn.ModuleList(layers[m]) for m in self.modalities})
        self.depth = next(iter(counts.values()))

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def stack(xs: Mapping[str, Tensor]) -> Tensor:
    """Stack same-shaped modality tensors on a new leading axis: (M, B, ...)."""
    return torch.stack(list(xs.values()), dim=0)
