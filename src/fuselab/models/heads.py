"""Heads: classification (logits per sample) and dense (logits per pixel) on fused feature maps.

Legend: b batch, c channels, h height, w width, k classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ClassificationHead(nn.Module):
    """Global average pooling of a map (B, C, H, W) (vectors pass through), dropout, Linear -> (B, K)."""

    dense = False

    def __init__(self, in_channels: int, num_classes: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.mean((-2, -1))
        return self.fc(self.dropout(x))


class DenseHead(nn.Module):
    """Per-pixel logits: an optional Conv3x3-BN-ReLU of ``hidden`` channels, dropout, Conv1x1 to K classes,
    then bilinear upsampling to the input's spatial size (``size``; the model passes it) where the fused map
    is coarser.

    (B, C, h, w) -> (B, K, H, W).
    """

    dense = True

    def __init__(self, in_channels: int, num_classes: int, *, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.block: nn.Module = nn.Identity()
        if hidden:
            self.block = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
            )
        hidden = hidden or in_channels
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        logits = self.classifier(self.dropout(self.block(x)))
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits


__all__ = ["ClassificationHead", "DenseHead"]
