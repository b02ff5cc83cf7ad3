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
    # "dihedral": shuffled (training) batches of maps get one random rotation by k * 90 degrees and flip per
    # batch, applied alike to every modality and the label map; None: no augmentation
    augment: str | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, index: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return {m: v[index] for m, v in self.x.items()}, self.y[index]

    def to(self, device: torch.device | str) -> "ModalTensors":
        return ModalTensors({m: v.to(device) for m, v in self.x.items()}, self.y.to(device), self.augment)

    def batch_bounds(self, batch_size: int, *, merge_lone: bool = False) -> list[int]:
        """Where the batches start, and the end: ``[0, b, 2b, ..., n]``. ``merge_lone``: a lone last sample
        joins the batch before it (batch norm cannot train on a batch of one; ``train.last_batch=merge``)."""
        n = len(self)
        bounds = [*range(0, n, batch_size), n]
        if merge_lone and len(bounds) > 2 and n - bounds[-2] == 1:
            del bounds[-2]
        return bounds

    def training_steps(self, batch_size: int, *, merge_lone: bool = False) -> int:
        """Optimiser steps per epoch: the number of training batches."""
        return len(self.batch_bounds(batch_size, merge_lone=merge_lone)) - 1

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None, shuffle: bool = False,
        merge_lone: bool = False,
    ) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.y.device)
        bounds = self.batch_bounds(batch_size, merge_lone=merge_lone)
        for start, stop in zip(bounds, bounds[1:]):
            if self.augment is not None and shuffle:
                x, y = self.take(order[start:stop])
                k = int(torch.randint(8, (1,), generator=generator))
                yield {m: dihedral(v, k) for m, v in x.items()}, dihedral(y, k)
            else:
                yield self.take(order[start:stop])


def dihedral(x: Tensor, k: int) -> Tensor:
    """The k-th of the 8 rotations / flips of the last two (spatial) axes: rotation by (k mod 4) * 90 degrees,
    then a flip of the last axis for k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
    return x.flip(-1) if k >= 4 else x


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
    # "classification" (labels (N,)), "change-detection" or "segmentation" (label maps (N, H, W) in which
    # IGNORE_INDEX marks unlabelled pixels); it picks the metric set (``fuselab.metrics``) and the head
    task: str = "classification"
    # cross-validation: one bundle per fold (every labelled sample tested once); a run trains each fold and
    # pools the test predictions. None for a single split.
    folds: list["DataBundle"] | None = None
    # the test split holds the training samples too (landsat-cd data.fold=all tests every labelled pixel): its
    # metrics measure the fit, not generalisation, and runs and reports say so
    test_in_sample: bool = False

    @property
    def modalities(self) -> list[str]:
        return sorted(self.dims)

    def to(self, device: torch.device | str) -> "DataBundle":
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


IGNORE_INDEX = -100  # label of an unlabelled pixel (PyTorch's cross-entropy default ``ignore_index``)
TASKS = ("classification", "change-detection", "segmentation")


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


def bundle_from_arrays(
    arrays: Mapping[str, np.ndarray],
    y: np.ndarray,
    *,
    seed: int,
    test_fraction: float,
    val_fraction: float,
    standardize_features: bool = True,
    class_names: list[str] | None = None,
) -> DataBundle:
    """A seeded stratified split of per-sample arrays ``{m: (N, ...)}``; the form of a modality follows its
    rank ((N, D) vector, (N, T, D) tokens, (N, C, H, W) map); vectors and tokens are standardised per feature
    with training statistics."""
    forms = {2: "vector", 3: "tokens", 4: "map"}
    names = list(arrays)
    parts = stratified_split(y, {"train": 0.0, "val": val_fraction, "test": test_fraction}, seed)
    splits: dict[str, dict[str, Tensor]] = {p: {} for p in parts}
    for m in names:
        x = torch.from_numpy(np.ascontiguousarray(arrays[m])).float()
        chunks = [x[torch.from_numpy(parts[p])] for p in ("train", "val", "test")]
        if standardize_features and x.dim() in (2, 3):
            scaled = standardize(*(c.reshape(-1, c.shape[-1]) for c in chunks))
            chunks = [f.reshape(c.shape) for f, c in zip(scaled, chunks)]
        for p, c in zip(("train", "val", "test"), chunks):
            splits[p][m] = c.contiguous()
    labels = torch.from_numpy(y)
    make = lambda p: ModalTensors(splits[p], labels[torch.from_numpy(parts[p])])  # noqa: E731
    return DataBundle(
        train=make("train"), val=make("val"), test=make("test"),
        dims={m: int(arrays[m].shape[1] if arrays[m].ndim == 4 else arrays[m].shape[-1]) for m in names},
        num_classes=len(class_names) if class_names else int(y.max()) + 1,
        forms={m: forms[arrays[m].ndim] for m in names},
        class_names=class_names,
    )
