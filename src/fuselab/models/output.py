"""What every fuselab model returns."""

from __future__ import annotations

import dataclasses

from torch import Tensor


@dataclasses.dataclass
class ModelOutput:
    """Args:
    logits: (B, K) class logits (or (B, K, H, W) for dense heads).
    modality_logits: per-modality logits when the model has per-modality heads, else None.
    features: the fused features the head saw, (B, D).
    aux_losses: auxiliary loss terms collected from the model's modules (unweighted).
    """

    logits: Tensor
    modality_logits: dict[str, Tensor] | None = None
    features: Tensor | None = None
    aux_losses: dict[str, Tensor] = dataclasses.field(default_factory=dict)
