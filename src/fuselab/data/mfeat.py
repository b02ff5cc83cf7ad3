"""UCI Multiple Features ("Handwritten"): 2,000 digits (200 per class), six views of one digit image.

Views: fou 76 Fourier coefficients, fac 216 profile correlations, kar 64 Karhunen-Loeve coefficients,
pix 240 pixel averages, zer 47 Zernike moments, mor 6 morphological features. A compressed copy ships
with fuselab (CC BY 4.0, see ``fuselab/data/NOTICE``); ``data_root`` reads the CSVs from a folder instead.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from fuselab.data.core import DataBundle, bundle_from_arrays
from fuselab.registry import DATASETS

VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}


def _view_file(view: str, data_root: str | None) -> Path:
    if data_root is None:
        return Path(str(resources.files("fuselab") / "data" / "mfeat" / f"mfeat-{view}.csv.xz"))
    root = Path(data_root).expanduser()
    for candidate in (root / f"mfeat-{view}.csv", root / "mfeat" / f"mfeat-{view}.csv", root / f"mfeat-{view}.csv.xz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"mfeat view '{view}' not found under {root}: expected mfeat-{view}.csv there (UCI Multiple Features, "
        "https://archive.ics.uci.edu/dataset/72), or leave data_root unset to use the bundled copy"
    )


@functools.lru_cache(maxsize=4)
def load_mfeat(views: tuple[str, ...], data_root: str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All 2,000 samples of the given views as float32 arrays, and the labels."""
    arrays, labels = {}, None
    for view in views:
        frame = pd.read_csv(_view_file(view, data_root))
        values = frame.to_numpy(dtype=np.float64)
        y = values[:, -1].astype(np.int64)
        if labels is None:
            labels = y
        elif not np.array_equal(labels, y):
            raise ValueError(f"mfeat view '{view}' has labels that disagree with the other views")
        arrays[view] = values[:, :-1].astype(np.float32)
        if arrays[view].shape[1] != VIEWS[view]:
            raise ValueError(f"mfeat view '{view}' has {arrays[view].shape[1]} features, expected {VIEWS[view]}")
    assert labels is not None
    return arrays, labels


@DATASETS.register("mfeat")
def mfeat(
    *,
    seed: int = 0,
    views: list[str] | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    data_root: str | None = None,
) -> DataBundle:
    """The mfeat digits split for one seed.

    Args:
        seed: fixes the stratified split (every method sees the same split for the same seed).
        views: which views are the modalities (default all six, in the order fou, fac, kar, pix, zer, mor).
        test_fraction: share of all samples held out for test (0.2: the 80/20 split of the multi-view literature).
        val_fraction: share of all samples carved from the training part for validation (early stopping).
        data_root: a folder with the mfeat CSVs; None reads the copy bundled with fuselab.
    """
    views = list(VIEWS) if views is None else list(views)
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown mfeat view '{unknown[0]}'; the views are {', '.join(VIEWS)}")
    if len(views) != len(set(views)) or not views:
        raise ValueError(f"data.views must name distinct views, got {views}")
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError("data.test_fraction and data.val_fraction must be in (0, 1) and sum to less than 1")
    arrays, labels = load_mfeat(tuple(views), data_root)
    return bundle_from_arrays({v: arrays[v] for v in views}, labels, seed=seed, test_fraction=test_fraction,
                              val_fraction=val_fraction, class_names=[str(d) for d in range(10)])
