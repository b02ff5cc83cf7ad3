"""``tensors``: your own data as arrays, one per modality plus labels, in one ``.npz`` or ``.pt`` file.

The file holds ``{modality: array (N, ...), "y": (N,)}``; the form of a modality follows its rank:
(N, D) vectors, (N, T, D) tokens, (N, C, H, W) maps. A seed fixes a stratified split; vector and token
modalities are standardised per feature on the training part only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fuselab.data.core import DataBundle, bundle_from_arrays
from fuselab.registry import DATASETS

FORMS = {2: "vector", 3: "tokens", 4: "map"}


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"data.path '{path}' does not exist; give a .npz or .pt file with one array per modality and y")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        if path.suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file, or a .pt that is not plain tensors
        import pickle

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):  # torch's advice to load it unsafely is not ours to give
            first = "damaged, or holds more than tensors and plain types, which are all that is loaded"
        raise ValueError(f"data.path '{path}' cannot be read as {path.suffix} ({first})") from None
    if path.suffix in (".pt", ".pth"):
        if not isinstance(obj, dict):
            raise ValueError(f"data.path '{path}' must hold a dict of modality -> tensor and y")
        return {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in obj.items()}
    raise ValueError(f"data.path '{path}' must be a .npz or .pt file")


@DATASETS.register("tensors")
def tensors(
    *,
    seed: int = 0,
    path: str = "",
    modalities: list[str] | None = None,
    label: str = "y",
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    standardize_features: bool = True,
) -> DataBundle:
    """Arrays from one file, split by seed.

    Args:
        path: the ``.npz`` / ``.pt`` file.
        modalities: which arrays are modalities (default: every array but the label).
        label: the name of the label array (integers 0..K-1).
        test_fraction / val_fraction: shares of all samples for test and validation.
        standardize_features: standardise vector and token modalities with training statistics.
    """
    arrays = _read(Path(path).expanduser())
    if label not in arrays:
        raise ValueError(f"data.path '{path}' has no label array '{label}'; arrays: {', '.join(sorted(arrays))}")
    y = arrays.pop(label).astype(np.int64).reshape(-1)
    names = sorted(arrays) if modalities is None else list(modalities)
    for m in names:
        if m not in arrays:
            raise ValueError(f"data.modalities: no array '{m}' in '{path}'; arrays: {', '.join(sorted(arrays))}")
        if arrays[m].shape[0] != len(y):
            raise ValueError(f"array '{m}' has {arrays[m].shape[0]} samples but '{label}' has {len(y)}")
        if arrays[m].ndim not in FORMS:
            raise ValueError(f"array '{m}' has shape {arrays[m].shape}; expected (N, D), (N, T, D) or (N, C, H, W)")
        if np.issubdtype(arrays[m].dtype, np.floating) and not np.isfinite(arrays[m]).all():
            bad = int((~np.isfinite(arrays[m])).sum())
            raise ValueError(f"array '{m}' in '{path}' has {bad} NaN or infinite values; impute or drop them first")
    return bundle_from_arrays({m: arrays[m] for m in names}, y, seed=seed, test_fraction=test_fraction,
                              val_fraction=val_fraction, standardize_features=standardize_features)
