"""In-memory multimodal datasets and their splits.

Legend: n samples, m modality, d width.

A dataset of fuselab is small enough to live in memory as tensors: ``{modality: (N, ...)}`` plus labels
``(N,)``. Batches are taken by indexing, never by per-sample Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import Tensor


@dataclasses.dataclass
class ModalTensors:
    """A split: modality-keyed inputs ``{m: (N, ...)}`` and labels ``(N,)``."""

    x: dict[str, Tensor]
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, index: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return {m: v[index] for m, v in self.x.items()}, self.y[index]

    def to(self, device: torch.device | str) -> "ModalTensors":
        return ModalTensors({m: v.to(device) for m, v in self.x.items()}, self.y.to(device))

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None, shuffle: bool = False
    ) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.y.device)
        for start in range(0, n, batch_size):
            yield self.take(order[start : start + batch_size])


@dataclasses.dataclass
class DataBundle:
    """A dataset split for one seed, with what a model needs to know about it."""

    train: ModalTensors
    val: ModalTensors
    test: ModalTensors
    dims: dict[str, int]  # feature width of each modality
    num_classes: int
    forms: dict[str, str]  # "vector" | "tokens" | "map" per modality
    class_names: list[str] | None = None

    @property
    def modalities(self) -> list[str]:
        return sorted(self.dims)

    def to(self, device: torch.device | str) -> "DataBundle":
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


def stratified_split(
    labels: np.ndarray, fractions: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Split indices by class so every part keeps the class proportions.

    ``fractions`` maps part names to fractions of the whole (the first part takes the remainder).
    Returns sorted index arrays; the same seed always gives the same split.
    """
    rng = np.random.default_rng(seed)
    names = list(fractions)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        sizes = {n: int(round(fractions[n] * len(idx))) for n in names[1:]}
        rest = len(idx) - sum(sizes.values())
        for n in names:
            size = rest if n == names[0] else sizes[n]
            parts[n].append(idx[start : start + size])
            start += size
    return {n: np.sort(np.concatenate(p)) for n, p in parts.items()}


def standardize(train: Tensor, *others: Tensor, eps: float = 1e-6) -> list[Tensor]:
    """Per-feature standardisation fitted on ``train`` only, applied to every split."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(eps)
    return [(t - mean) / std for t in (train, *others)]
