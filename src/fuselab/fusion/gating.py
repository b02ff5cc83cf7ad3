"""Gating merges: attention-weighted sum, gated multimodal unit, FiLM.

Legend: b batch, m modality, d width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from fuselab.fusion.base import Merge, resolve_order
from fuselab.fusion.basic import project_to_common
from fuselab.registry import FUSIONS


@FUSIONS.register("attention")
class AttentionWeighted(Merge):
    """Attention fusion: softmax weights over modalities from a Linear on the concatenated inputs, then a
    weighted sum of per-modality projections to a common width.

    Reference: TorchMultimodal ``modules/fusions/attention_fusion.py`` (AttentionFusionModule). Differences:
    the common width defaults to the largest input width instead of the smallest, and the scoring layer
    starts at zero, so training starts from the mean of the modalities (with random scores the softmax
    tends to lock onto one strong modality early; measured on mfeat's six views: 97.8 % vs 98.8 % for mean).
    """

    forms = ("vector", "tokens")
    multimodal_rule = "one softmax weight per modality, computed from all modalities"
    natural_out_dim = "the largest input width"
    paper = "attention-weighted modality sum (TorchMultimodal AttentionFusionModule)"
    reference = "TorchMultimodal modules/fusions/attention_fusion.py"
    formula = "w = softmax(W [x_1..x_M]), z = sum_m w_m P_m x_m"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        self.out_dim = out_dim or max(self.dims.values())
        self.score = nn.Linear(sum(self.dims.values()), len(self.dims))
        nn.init.zeros_(self.score.weight)  # uniform weights at the start: the mean of the modalities
        self.proj = project_to_common(self.dims, self.out_dim)

    def weights(self, xs: Mapping[str, Tensor]) -> Tensor:
        """(..., M) softmax weights of the modalities, in sorted order."""
        return self.score(torch.cat(list(xs.values()), dim=-1)).softmax(-1)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        w = self.weights(xs)  # (..., M)
        ys = torch.stack([self.proj[m](x) for m, x in xs.items()], dim=-2)  # (..., M, D)
        return (w.unsqueeze(-1) * ys).sum(-2)

    @torch.no_grad()
    def fusion_stats(self, inputs: Mapping[str, Tensor]) -> dict[str, float]:
        """Mean weight of each modality on ``inputs`` (``weight/<m>``; they sum to one)."""
        w = self.weights(self.check_inputs(inputs)).reshape(-1, len(self.modalities)).mean(0)
        return {f"weight/{m}": float(v) for m, v in zip(self.modalities, w)}


@FUSIONS.register("gated")
class Gated(Merge):
    """Gated Multimodal Unit: ``h_m = tanh(W_m x_m)``, gates from all inputs, gated sum of the ``h_m``.

    Paper: Arevalo et al., "Gated Multimodal Units for Information Fusion", ICLR-W 2017.
    Reference: johnarevalo/gmu-mmimdb. With two modalities the paper's ``z, 1 - z`` with
    ``z = sigmoid(W_z [a, b])`` is a softmax over two gate logits; for M modalities fuselab uses a softmax
    over M gate logits per feature (the paper's own extension to more modalities).
    """

    forms = ("vector", "tokens")
    multimodal_rule = "softmax over M gate logits per feature (sigmoid z / 1-z when M = 2)"
    natural_out_dim = "the largest input width"
    paper = "Arevalo et al., Gated Multimodal Units for Information Fusion, ICLR Workshop 2017"
    reference = "johnarevalo/gmu-mmimdb"
    formula = "h_m = tanh(W_m x_m), g = softmax_m(W_z [x_1..x_M]), z = sum_m g_m * h_m"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        self.out_dim = out_dim or max(self.dims.values())
        self.hidden = nn.ModuleDict({m: nn.Linear(d, self.out_dim, bias=False) for m, d in self.dims.items()})
        self.gate = nn.Linear(sum(self.dims.values()), len(self.dims) * self.out_dim)

    def gates(self, xs: Mapping[str, Tensor]) -> Tensor:
        """(..., M, D) gates: a softmax over the modalities per feature."""
        g = rearrange(self.gate(torch.cat(list(xs.values()), dim=-1)), "... (m d) -> ... m d", m=len(xs))
        return g.softmax(-2)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        h = torch.stack([torch.tanh(self.hidden[m](x)) for m, x in xs.items()], dim=-2)  # (..., M, D)
        return (self.gates(xs) * h).sum(-2)

    @torch.no_grad()
    def fusion_stats(self, inputs: Mapping[str, Tensor]) -> dict[str, float]:
        """Mean gate of each modality on ``inputs`` over samples and features (``weight/<m>``; sum to one)."""
        g = self.gates(self.check_inputs(inputs))
        w = g.transpose(-2, -1).reshape(-1, len(self.modalities)).mean(0)
        return {f"weight/{m}": float(v) for m, v in zip(self.modalities, w)}


@FUSIONS.register("film")
class FiLM(Merge):
    """Feature-wise linear modulation: the ``target`` modality is scaled and shifted by the others.

    Paper: Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI 2018.
    Reference: ethanjperez/film. The conditioning input is the concatenation of all non-target
    modalities. ``gamma`` is predicted as ``1 + delta`` so that the layer starts near identity (the
    paper's appendix reports that predicting the deviation from 1 trains better).
    ``target`` defaults to the first modality of ``order`` (sorted names by default).
    """

    forms = ("vector", "tokens")
    asymmetric = True
    multimodal_rule = "the target modality is modulated by the concatenation of all other modalities"
    natural_out_dim = "the target's width"
    paper = "Perez et al., FiLM: Visual Reasoning with a General Conditioning Layer, AAAI 2018"
    reference = "ethanjperez/film"
    formula = "c = [x_m for m != t], z = (1 + dgamma(c)) * x_t + beta(c)"

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int | None = None,
        *,
        target: str | None = None,
        order: Sequence[str] | None = None,
    ) -> None:
        super().__init__(dims, out_dim)
        order = resolve_order(list(self.dims), order, "film")
        self.target = target if target is not None else order[0]
        if self.target not in self.dims:
            raise ValueError(f"film: target '{self.target}' is not a modality; modalities are {self.modalities}")
        self.context = [m for m in self.modalities if m != self.target]
        width = self.dims[self.target]
        self.film = nn.Linear(sum(self.dims[m] for m in self.context), 2 * width)
        self.proj = nn.Linear(width, out_dim) if out_dim is not None else nn.Identity()
        self.out_dim = out_dim or width

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        c = torch.cat([xs[m] for m in self.context], dim=-1)
        dgamma, beta = self.film(c).chunk(2, dim=-1)
        return self.proj((1 + dgamma) * xs[self.target] + beta)
