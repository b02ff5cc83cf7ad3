"""A new fusion idea and a changed loss, as a fuselab plugin.

``gated-sum``: each modality is projected to a common width and scaled by a learned, input-dependent gate
in (0, 1) of its own (unlike ``gated``, the gates do not compete through a softmax).
``confidence-penalty``: Pereyra et al. 2017, ``-beta * H(p)``, added to the cross-entropy by weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fuselab import register_fusion, register_loss
from fuselab.fusion import Merge


@register_fusion("gated-sum")
class GatedSum(Merge):
    """Sum of independently gated modality projections: ``z = sum_m sigmoid(g_m(x_m)) * P_m x_m``."""

    forms = ("vector", "tokens")
    multimodal_rule = "one independent sigmoid gate per modality, then the sum"
    natural_out_dim = "the largest input width"
    paper = "(example plugin)"
    reference = "examples/my-idea/my_idea.py"
    formula = "z = sum_m sigmoid(g_m(x_m)) * P_m x_m"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        self.out_dim = out_dim or max(self.dims.values())
        self.proj = nn.ModuleDict({m: nn.Linear(d, self.out_dim) for m, d in self.dims.items()})
        self.gate = nn.ModuleDict({m: nn.Linear(d, 1) for m, d in self.dims.items()})

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        return sum(torch.sigmoid(self.gate[m](x)) * self.proj[m](x) for m, x in xs.items())


@register_loss("confidence-penalty")
def confidence_penalty():
    """Minus the mean entropy of the predicted distribution (weight it with ``weight: beta``)."""

    def term(output, target: Tensor) -> Tensor:
        logp = output.logits.log_softmax(-1)
        return (logp.exp() * logp).sum(-1).mean()  # = -H(p)

    return term
