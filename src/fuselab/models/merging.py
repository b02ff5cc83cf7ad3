"""The merge and the head of a builder, made one way for every model family.

Legend: b batch, d width, k classes.

Every builder reads the ``fusion`` section the same way: the operator's name and options, whether it merges
logits (then it gets ``out_dim = num_classes`` and the model has no head of its own), and a one-modality
model's ``SingleStream`` in place of a merge. :func:`merge_and_head` does that once; the builder then asks the
result for its merge(s) and, after whatever it builds on the fused features (a trunk, a neck), for its head,
so the parameters are created in the builder's order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

import fuselab.api as api
from fuselab.models.multistream import SingleStream


def linear_head(width: int, num_classes: int, *, dropout: float = 0.0) -> nn.Sequential:
    """Dropout then Linear: (B, d) -> (B, k)."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))


@dataclasses.dataclass
class MergeAndHead:
    """The fusion section of a builder, resolved.

    Attributes:
        name: the merge operator's registered name.
        options: its options (with ``out_dim = num_classes`` when it merges logits).
        info: its ``fusion_info``.
        produces_logits: the merge gives the logits (late fusion): no head.
        unimodal: one modality: ``SingleStream`` instead of the operator.
        num_classes: classes of the head.
    """

    name: str
    options: dict[str, Any]
    info: Any
    produces_logits: bool
    unimodal: bool
    num_classes: int

    def merge(self, dims: Mapping[str, int]) -> nn.Module:
        """The merge of streams of widths ``dims`` (call once per fused stage for multi-scale fusion)."""
        if self.unimodal:
            return SingleStream(dims)
        return api.create_fusion(self.name, dims=dims, **self.options)

    def head(self, width: int, *, dropout: float = 0.0,
             make: Callable[[int], nn.Module] | None = None) -> nn.Module | None:
        """The head on fused features of ``width``: None when the merge gives the logits, else ``make(width)``
        (default :func:`linear_head`)."""
        if self.produces_logits:
            return None
        return make(width) if make is not None else linear_head(width, self.num_classes, dropout=dropout)


def merge_and_head(fusion: Mapping[str, Any], *, num_classes: int, unimodal: bool = False,
                   logits_error: str | None = None) -> MergeAndHead:
    """Resolve a builder's ``fusion`` section (``name`` and options).

    Args:
        fusion: the section; it is not modified.
        num_classes: classes of the head, and the ``out_dim`` of a merge of logits.
        unimodal: the data has one modality: no merge (``SingleStream``), and never a merge of logits.
        logits_error: where the builder takes no merge of logits, the message of the ValueError raised
            for one (``{name}`` is replaced by the operator's name).
    """
    options = dict(fusion)
    name = options.pop("name")
    info = api.fusion_info(name)
    produces_logits = info.produces_logits and not unimodal
    if produces_logits:
        if logits_error is not None:
            raise ValueError(logits_error.format(name=name))
        options["out_dim"] = num_classes
    return MergeAndHead(name=name, options=options, info=info, produces_logits=produces_logits, unimodal=unimodal,
                        num_classes=num_classes)


__all__ = ["MergeAndHead", "linear_head", "merge_and_head"]
