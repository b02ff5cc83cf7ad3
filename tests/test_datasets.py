"""Every registered dataset keeps the data contract a model and the training loop rely on: the same modalities
in ``dims``, ``forms`` and every split, shapes that match the declared widths and forms, finite inputs,
labels in range for the task, folds that are bundles themselves, and the same data for the same seed.

A new dataset is one file plus one entry in ``EXAMPLES`` (options for a small instance of it): the
registry-wide test fails for a built-in dataset without one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import fuselab.data  # noqa: F401  (registers the built-in datasets)
from fuselab.data.core import IGNORE_INDEX, TASKS, DataBundle, ModalTensors
from fuselab.registry import DATASETS

RANKS = {"vector": 2, "tokens": 3, "map": 4}


def _images(root: Path, folders: dict[str, Callable[[np.random.Generator, int], np.ndarray]], n: int) -> Path:
    rng = np.random.default_rng(0)
    for sub, make in folders.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(make(rng, i)).save(root / sub / f"s{i:02d}.png")
    return root


def _cd_folder(tmp: Path) -> dict[str, Any]:
    rgb = lambda rng, i: rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)  # noqa: E731
    change = lambda rng, i: ((np.arange(256).reshape(16, 16) + i) % 7 == 0).astype(np.uint8) * 255  # noqa: E731
    return {"root": str(_images(tmp / "cd", {"A": rgb, "B": rgb, "label": change}, 6))}


def _seg_folder(tmp: Path) -> dict[str, Any]:
    rgb = lambda rng, i: rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)  # noqa: E731
    depth = lambda rng, i: rng.integers(500, 5000, size=(16, 16)).astype(np.uint16)  # noqa: E731
    label = lambda rng, i: np.where(np.arange(256).reshape(16, 16) < 16, 255, (np.arange(256).reshape(16, 16) + i) % 3).astype(np.uint8)  # noqa: E731
    return {"root": str(_images(tmp / "seg", {"rgb": rgb, "depth": depth, "label": label}, 6))}


def _paired_folder(tmp: Path) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    root = tmp / "pairs"
    for i in range(30):
        for m in ("rgb", "depth"):
            (root / m / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(6, 6, 3), dtype=np.uint8)).save(root / "rgb" / f"class{i % 3}" / f"s{i:02d}.png")
        np.save(root / "depth" / f"class{i % 3}" / f"s{i:02d}.npy", rng.normal(size=4).astype(np.float32))
    return {"root": str(root)}


def _tensors(tmp: Path) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    path = tmp / "mine.npz"
    np.savez(path, image=rng.normal(size=(60, 1, 8, 8)).astype(np.float32), seq=rng.normal(size=(60, 5, 3)).astype(np.float32),
             vec=rng.normal(size=(60, 4)).astype(np.float32), y=np.arange(60) % 3)
    return {"path": str(path)}


# name -> (needs the shared real data, options of a small instance given the data root and a scratch folder)
EXAMPLES: dict[str, tuple[bool, Callable[[Path | None, Path], dict[str, Any]]]] = {
    "mfeat": (False, lambda root, tmp: {"views": ["fou", "kar", "pix"]}),
    "tensors": (False, lambda root, tmp: _tensors(tmp)),
    "cd-folder": (False, lambda root, tmp: _cd_folder(tmp)),
    "seg-folder": (False, lambda root, tmp: _seg_folder(tmp)),
    "paired-folder": (False, lambda root, tmp: _paired_folder(tmp)),
    "landsat-cd": (True, lambda root, tmp: {"data_root": str(root), "fold": 0}),
    "avmnist": (True, lambda root, tmp: {"data_root": str(root), "train_size": 40, "val_size": 20, "test_size": 20}),
}


def _built_in() -> list[str]:
    """Datasets registered by fuselab itself (plugins registered by other tests are not part of the contract)."""
    return sorted(n for n in DATASETS.list() if getattr(DATASETS.get(n), "__module__", "").startswith("fuselab."))


def test_every_built_in_dataset_has_an_example():
    missing = [n for n in _built_in() if n not in EXAMPLES]
    assert not missing, f"add an entry to EXAMPLES in tests/test_datasets.py for {missing}"
    assert len(_built_in()) >= 7 and not set(EXAMPLES) - set(_built_in())


def _check_split(split: ModalTensors, bundle: DataBundle, where: str) -> None:
    assert sorted(split.x) == bundle.modalities, where
    n = len(split.y)
    assert n > 0 and split.y.dtype == torch.long, where
    for m, x in split.x.items():
        assert x.shape[0] == n, f"{where}/{m}: {x.shape[0]} samples for {n} labels"
        assert x.dim() == RANKS[bundle.forms[m]], f"{where}/{m}: shape {tuple(x.shape)} is not a {bundle.forms[m]}"
        dim = bundle.dims[m]
        if isinstance(dim, int):  # a width: features (vector, tokens) or channels (map)
            assert x.shape[1 if bundle.forms[m] == "map" else -1] == dim, f"{where}/{m}: width {dim} vs {tuple(x.shape)}"
        else:  # a whole sample shape
            assert tuple(x.shape[1:]) == tuple(dim), f"{where}/{m}: shape {tuple(dim)} vs {tuple(x.shape)}"
        assert torch.isfinite(x).all(), f"{where}/{m}: non-finite inputs"
    labelled = split.y[split.y != IGNORE_INDEX]
    assert labelled.numel() > 0 and 0 <= int(labelled.min()) and int(labelled.max()) < bundle.num_classes, where
    if bundle.task == "classification":
        assert split.y.dim() == 1 and (split.y != IGNORE_INDEX).all(), where
    else:  # one label per pixel, at the input's size
        maps = [x for m, x in split.x.items() if bundle.forms[m] == "map"]
        assert split.y.dim() == 3 and maps and all(tuple(x.shape[-2:]) == tuple(split.y.shape[-2:]) for x in maps), where


def _check_bundle(bundle: DataBundle, where: str) -> None:
    assert isinstance(bundle, DataBundle) and bundle.task in TASKS, where
    assert sorted(bundle.dims) == sorted(bundle.forms) == bundle.modalities and bundle.modalities, where
    assert set(bundle.forms.values()) <= set(RANKS), where
    assert bundle.num_classes >= 2, where
    assert bundle.class_names is None or len(bundle.class_names) == bundle.num_classes, where
    for name in ("train", "val", "test"):
        _check_split(getattr(bundle, name), bundle, f"{where}.{name}")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_dataset_keeps_the_data_contract(name, request, tmp_path, monkeypatch):
    needs_data, options = EXAMPLES[name]
    root = request.getfixturevalue("data_root") if needs_data else None  # fails under CI without the data
    monkeypatch.setenv("FUSELAB_CACHE", str(tmp_path / "cache"))  # feature caches stay in the scratch folder
    make = DATASETS.get(name)
    bundle = make(seed=0, **options(root, tmp_path))
    _check_bundle(bundle, name)
    for i, fold in enumerate(bundle.folds or []):
        _check_bundle(fold, f"{name}.fold{i}")
    (tmp_path / "again").mkdir()
    again = make(seed=0, **options(root, tmp_path / "again"))  # the same seed: the same data
    for part in ("train", "val", "test"):
        first, second = getattr(bundle, part), getattr(again, part)
        assert torch.equal(first.y, second.y), f"{name}.{part}: labels differ between two builds of seed 0"
        assert all(torch.equal(first.x[m], second.x[m]) for m in first.x), f"{name}.{part}: inputs differ"
