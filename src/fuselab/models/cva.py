"""``cva``: change-vector analysis with an Otsu threshold, the classic unsupervised change-detection baseline.

Legend: b batch, c bands, h height, w width.

Per image pair: each band of each date is standardised over the image (zero mean, unit variance), the
change magnitude is ``|x_t2 - x_t1|_2`` over the bands, and Otsu's threshold on the histogram of the
magnitudes (``bins`` bins over the image's range) separates changed from unchanged pixels. Nothing is learnt
(``needs_training = False``): a run only evaluates it, so it goes through the same run, store and report as
the trained methods. The logits are ``(t - m, m - t)``, class 1 = change.

References: Malila, "Change vector analysis: an approach for detecting forest changes with Landsat", 1980;
Otsu, "A threshold selection method from gray-level histograms", IEEE SMC 1979.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fuselab.fusion.base import resolve_order
from fuselab.registry import MODELS


def otsu_threshold(values: Tensor, bins: int = 256) -> Tensor:
    """Otsu's threshold of a 1-D tensor: the centre of the bin that best splits the histogram (maximal
    between-class variance of the bins up to it and those above it), as scikit-image's ``threshold_otsu``."""
    lo, hi = values.min(), values.max()
    if hi <= lo:
        return hi
    # in float64 on the CPU (the histogram is small; MPS has no float64), the threshold back on values' device
    hist = torch.histc(values.detach().to("cpu", torch.float64), bins=bins, min=float(lo), max=float(hi))
    edges = torch.linspace(float(lo), float(hi), bins + 1, dtype=torch.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = hist.cumsum(0)
    w1 = w0[-1] - w0
    m0 = (hist * centres).cumsum(0)
    mu0 = m0 / w0.clamp_min(1e-12)
    mu1 = (m0[-1] - m0) / w1.clamp_min(1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return centres[int(between.argmax())].to(values.device, values.dtype)


def standardise_bands(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Per image and band: zero mean, unit variance over the pixels. (B, C, H, W) -> same."""
    mean = x.mean((-2, -1), keepdim=True)
    std = x.std((-2, -1), keepdim=True).clamp_min(eps)
    return (x - mean) / std


class ChangeVectorAnalysis(nn.Module):
    """CVA + Otsu on two co-registered images of the same bands (see the module docstring)."""

    needs_training = False

    def __init__(self, order: Sequence[str], *, bins: int = 256) -> None:
        super().__init__()
        self.order = list(order)
        self.bins = int(bins)

    def magnitude(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """(B, H, W) change magnitudes."""
        first, second = (standardise_bands(inputs[m].float()) for m in self.order)
        return (second - first).pow(2).sum(1).sqrt()

    def forward(self, inputs: Mapping[str, Tensor]):
        from fuselab.models.output import ModelOutput

        missing = [m for m in self.order if m not in inputs]
        if missing:
            raise ValueError(f"missing modality '{missing[0]}'; cva was built for {self.order}")
        magnitude = self.magnitude(inputs)
        thresholds = torch.stack([otsu_threshold(m.reshape(-1), self.bins) for m in magnitude]).view(-1, 1, 1)
        score = magnitude - thresholds
        return ModelOutput(logits=torch.stack([-score, score], dim=1))


@MODELS.register("cva")
def cva(
    *,
    dims: Mapping[str, Any],
    num_classes: int,
    fusion: Mapping[str, Any] | None = None,
    order: list[str] | None = None,
    bins: int = 256,
    dense: bool = True,
) -> ChangeVectorAnalysis:
    """Change-vector analysis with an Otsu threshold (no training; the ``fusion`` section is not used).

    Args:
        dims: bands per date (two modalities with the same number of bands).
        num_classes: must be 2 (unchanged, change).
        order: the two dates, earlier first (default: sorted names; the magnitude does not depend on it).
        bins: histogram bins of Otsu's method.
        dense: must be True (cva labels pixels).
    """
    if len(dims) != 2:
        raise ValueError(f"cva compares two images (dates), got {len(dims)} modalities")
    if num_classes != 2:
        raise ValueError(f"cva labels pixels changed / unchanged (2 classes), got {num_classes} classes")
    if not dense:
        raise ValueError("cva is a per-pixel method; use it on a change-detection dataset")
    widths = set(dims.values())
    if len(widths) != 1:
        raise ValueError(f"cva needs the same bands in both images, got {dict(dims)}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"model.bins must be an integer >= 2, got {bins!r}")
    return ChangeVectorAnalysis(resolve_order(list(dims), order, "cva"), bins=bins)


__all__ = ["ChangeVectorAnalysis", "cva", "otsu_threshold", "standardise_bands"]
cva.own_fusion = True  # type: ignore[attr-defined]  # no learned fusion: the config's fusion section is unused
