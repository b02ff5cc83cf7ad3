"""Loss terms and their weighted sum.

The loss of a run is ``sum_i weight_i * term_i(output, target)``; each term is registered in ``LOSSES``
(``register_loss``) as a factory ``(**options) -> callable(output: ModelOutput, target) -> Tensor``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fuselab.models.output import ModelOutput
from fuselab.registry import LOSSES

LossTerm = Callable[[ModelOutput, Tensor], Tensor]


@LOSSES.register("ce")
def cross_entropy(*, label_smoothing: float = 0.0) -> LossTerm:
    """Cross-entropy of the model's logits."""

    def term(output: ModelOutput, target: Tensor) -> Tensor:
        return F.cross_entropy(output.logits, target, label_smoothing=label_smoothing)

    return term


@LOSSES.register("dense-ce")
def dense_cross_entropy(*, ignore_index: int = -100, class_weights: list[float] | None = None,
                        label_smoothing: float = 0.0) -> LossTerm:
    """Cross-entropy of per-pixel logits (B, K, H, W) against a label map (B, H, W), averaged over the
    labelled pixels only: pixels labelled ``ignore_index`` (unlabelled) contribute nothing, whatever the
    logits there; a batch without labelled pixels gives 0 (not NaN). ``class_weights`` weigh the classes
    (as in ``F.cross_entropy``, the mean is then weighted too)."""

    def term(output: ModelOutput, target: Tensor) -> Tensor:
        logits = output.logits
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
        per_pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none",
                                    label_smoothing=label_smoothing)
        keep = target != ignore_index
        if weight is None:
            denominator = keep.sum()
        else:
            denominator = weight[target.clamp_min(0)].masked_fill(~keep, 0).sum()
        return per_pixel.sum() / denominator.clamp_min(1)

    return term


@LOSSES.register("focal")
def focal(*, gamma: float = 2.0) -> LossTerm:
    """Focal loss (Lin et al., ICCV 2017): ``-(1 - p_t)^gamma log p_t``, averaged over samples."""

    def term(output: ModelOutput, target: Tensor) -> Tensor:
        logp = F.log_softmax(output.logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        return (-(1 - logp.exp()) ** gamma * logp).mean()

    return term


@LOSSES.register("aux-unimodal")
def aux_unimodal(*, label_smoothing: float = 0.0, reduction: str = "mean") -> LossTerm:
    """Cross-entropy of the per-modality heads, their mean or (``reduction="sum"``) their sum.

    Needs a model with per-modality logits. ``"sum"`` is the official CEN loss, which adds the loss of every
    output. Per-pixel logits work too: unlabelled pixels (``IGNORE_INDEX``, PyTorch's default
    ``ignore_index``) are left out."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss term 'aux-unimodal': reduction must be 'mean' or 'sum', got {reduction!r}")

    def term(output: ModelOutput, target: Tensor) -> Tensor:
        if not output.modality_logits:
            raise ValueError("loss term 'aux-unimodal' needs per-modality heads: set model.modality_heads=true")
        logits = list(output.modality_logits.values())
        if logits[0].dim() > 2:  # per-pixel: mean over the labelled pixels, 0 (not NaN) when there are none
            labelled = (target != -100).sum().clamp_min(1)
            losses = [F.cross_entropy(lg, target, reduction="none", label_smoothing=label_smoothing).sum() / labelled
                      for lg in logits]
        else:
            losses = [F.cross_entropy(lg, target, label_smoothing=label_smoothing) for lg in logits]
        return torch.stack(losses).sum() if reduction == "sum" else torch.stack(losses).mean()

    return term


@LOSSES.register("aux")
def aux(*, include: str = "*") -> LossTerm:
    """Sum of the model's own auxiliary losses (``aux_losses()`` of its modules) whose key matches ``include``."""
    import fnmatch

    def term(output: ModelOutput, target: Tensor) -> Tensor:
        values = [v for k, v in output.aux_losses.items() if fnmatch.fnmatchcase(k, include)]
        return torch.stack(values).sum() if values else output.logits.new_zeros(())

    return term


@LOSSES.register("cen-sparsity")
def cen_sparsity() -> LossTerm:
    """CEN's L1 sparsity term: the sum of ``cen_sparsity`` of every ``channel-exchange`` in the model, i.e.
    |BN scale| summed over each modality's own part of the channels (use weight 2e-4, the paper's lambda).
    A model without a channel exchange is an error, not a silent zero."""

    def term(output: ModelOutput, target: Tensor) -> Tensor:
        values = [v for k, v in output.aux_losses.items() if k.rsplit(".", 1)[-1] == "cen_sparsity"]
        if not values:
            raise ValueError("loss term 'cen-sparsity' needs a model with a channel-exchange (e.g. model.name=cen)")
        return torch.stack(values).sum()

    return term


class WeightedLoss:
    """The weighted sum of loss terms.

    Args:
        terms: ``[{"name": "ce", "weight": 1.0, **options}, ...]``.

    Calling it returns the total and each term's (unweighted) value, keyed by the term's name.
    """

    def __init__(self, terms: Sequence[Mapping[str, Any]]) -> None:
        if not terms:
            raise ValueError("loss.terms is empty; give at least one term, e.g. [{name: ce, weight: 1.0}]")
        self.terms: list[tuple[str, float, LossTerm]] = []
        seen: set[str] = set()
        for spec in terms:
            spec = dict(spec)
            if "name" not in spec:
                raise ValueError(f"loss term {spec} has no name; e.g. {{name: ce, weight: 1.0}}")
            name = spec.pop("name")
            weight = float(spec.pop("weight", 1.0))
            key = name if name not in seen else f"{name}_{len(self.terms)}"
            seen.add(key)
            self.terms.append((key, weight, LOSSES.get(name)(**spec)))

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.terms]

    def __call__(self, output: ModelOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        values = {name: fn(output, target) for name, _, fn in self.terms}
        total: Tensor | None = None
        for name, w, _ in self.terms:  # no multiplication by 1 and no 0 + ... : each op costs in a small step
            term = values[name] if w == 1.0 else w * values[name]
            total = term if total is None else total + term
        assert total is not None
        return total, values
