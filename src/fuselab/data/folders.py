"""Users' own dense datasets from image folders: ``cd-folder`` (change detection) and ``seg-folder``
(multimodal semantic segmentation).

Legend: n images, m modality, c channels, h height, w width.

``cd-folder`` reads the layout LEVIR-CD and WHU-CD ship: ``A/`` (first date), ``B/`` (second date) and
``label/`` (change masks: non-zero = change), files paired by name (stem). ``seg-folder`` reads one
sub-folder per modality (``rgb/``, ``depth/``, ...) plus ``label/`` (class indices; ``ignore_label`` marks
unlabelled pixels), as RGB-D segmentation sets are usually exported. Either layout may sit in ``train/``,
``val/`` and ``test/`` sub-folders (the official split, used as is); otherwise the images are split by the
seed (``val_fraction``, ``test_fraction``). Images live in memory as float tensors, standardised per channel
with the training images' statistics; ``tile`` cuts every image into tiles of that side (the last ones
aligned with the border) to keep batches small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fuselab.data.core import IGNORE_INDEX, DataBundle, ModalTensors
from fuselab.registry import DATASETS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "val", "test")


def _image_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder '{folder}' does not exist")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def read_image(path: Path) -> np.ndarray:
    """An image as (C, H, W) float32 (16-bit depth maps keep their values)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode == "P":
            image = image.convert("RGB")
        array = np.asarray(image)
    array = array.astype(np.float32)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def read_label(path: Path) -> np.ndarray:
    """A label image as (H, W) int64: the palette index or grey value (first channel of RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., 0]
    return array.astype(np.int64)


def _pair(root: Path, folders: list[str], what: str) -> tuple[list[str], dict[str, dict[str, Path]]]:
    """Files of each folder under ``root``, matched by stem; a file missing in one folder is an error."""
    files = {f: _image_files(root / f) for f in folders}
    stems = sorted(set().union(*(set(v) for v in files.values())))
    if not stems:
        raise FileNotFoundError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(f + '/' for f in folders)} under '{root}'")
    for stem in stems:
        absent = [f for f in folders if stem not in files[f]]
        if absent:
            raise FileNotFoundError(f"{what}: '{stem}' has no file in {absent[0]}/ under '{root}' (every image needs "
                                    f"one file in each of {', '.join(f + '/' for f in folders)})")
    return stems, files


def _tiles(array: np.ndarray, tile: int | None) -> list[np.ndarray]:
    if tile is None:
        return [array]
    h, w = array.shape[-2:]
    rows = list(range(0, max(h - tile, 0) + 1, tile)) or [0]
    cols = list(range(0, max(w - tile, 0) + 1, tile)) or [0]
    if rows[-1] + tile < h:
        rows.append(h - tile)
    if cols[-1] + tile < w:
        cols.append(w - tile)
    return [array[..., r : r + tile, c : c + tile] for r in rows for c in cols]


def _load(root: Path, modalities: list[str], label: str, what: str, tile: int | None,
          convert) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray]]:
    stems, files = _pair(root, [*modalities, label], what)
    xs: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    ys: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    for stem in stems:
        images = {m: read_image(files[m][stem]) for m in modalities}
        y = convert(read_label(files[label][stem]))
        shapes = {m: a.shape[1:] for m, a in images.items()} | {label: y.shape}
        if len(set(shapes.values())) != 1:
            detail = ", ".join(f"{k}/ {v[0]}x{v[1]}" for k, v in shapes.items())
            raise ValueError(f"{what}: '{stem}' has unequal sizes between modalities ({detail}); every modality "
                             "and the label must share one pixel grid")
        if tile is None:
            size = size or y.shape
            if y.shape != size:
                raise ValueError(f"{what}: '{stem}' is {y.shape[0]}x{y.shape[1]} but other images are {size[0]}x{size[1]}; "
                                 "set data.tile to cut all images into tiles of one size")
        elif min(y.shape) < tile:
            raise ValueError(f"{what}: '{stem}' ({y.shape[0]}x{y.shape[1]}) is smaller than data.tile={tile}")
        for m in modalities:
            channels = {a.shape[0] for a in xs[m][:1]}
            if channels and images[m].shape[0] not in channels:
                raise ValueError(f"{what}: '{stem}' in {m}/ has {images[m].shape[0]} channels, others have {channels.pop()}")
            xs[m].extend(_tiles(images[m], tile))
        ys.extend(_tiles(y, tile))
    return xs, ys


def _bundle(parts: dict[str, tuple[dict[str, list[np.ndarray]], list[np.ndarray]]], modalities: list[str],
            num_classes: int, task: str, class_names: list[str] | None) -> DataBundle:
    tensors = {}
    for split, (xs, ys) in parts.items():
        tensors[split] = ({m: torch.from_numpy(np.stack(xs[m])) for m in modalities}, torch.from_numpy(np.stack(ys)))
    train_x = tensors["train"][0]
    stats = {m: (train_x[m].mean((0, 2, 3), keepdim=True)[0], train_x[m].std((0, 2, 3), keepdim=True)[0].clamp_min(1e-6))
             for m in modalities}
    splits = {
        split: ModalTensors({m: ((x[m] - stats[m][0]) / stats[m][1]).contiguous() for m in modalities}, y)
        for split, (x, y) in tensors.items()
    }
    return DataBundle(
        train=splits["train"], val=splits["val"], test=splits["test"],
        dims={m: int(train_x[m].shape[1]) for m in modalities}, num_classes=num_classes,
        forms={m: "map" for m in modalities}, class_names=class_names, task=task,
    )


def _split_parts(root: Path, folders: list[str], what: str, seed: int, val_fraction: float, test_fraction: float):
    """(split -> folder root) for an official split, or (None, index parts) for a seeded split."""
    if all((root / s).is_dir() for s in SPLITS):
        return {s: root / s for s in SPLITS}
    if any((root / s).is_dir() for s in SPLITS):
        missing = [s for s in SPLITS if not (root / s).is_dir()]
        raise FileNotFoundError(f"{what}: '{root}' has split folders but no {missing[0]}/; give train/, val/ and test/, "
                                f"or none of them (a seeded split)")
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("data.val_fraction and data.test_fraction must be in (0, 1) and sum to less than 1")
    return None


def _seeded(xs_ys, seed: int, val_fraction: float, test_fraction: float, what: str):
    xs, ys = xs_ys
    n = len(ys)
    if n < 3:
        raise ValueError(f"{what}: a seeded split needs at least 3 images (or tiles), got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    n_val = max(1, int(round(val_fraction * n)))
    index = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {s: ({m: [v[i] for i in idx] for m, v in xs.items()}, [ys[i] for i in idx]) for s, idx in index.items()}


def _resolve(root: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.root '{path}' is not a folder")
    return path


@DATASETS.register("cd-folder")
def cd_folder(
    *,
    seed: int = 0,
    root: str = "",
    tile: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> DataBundle:
    """Change detection from ``A/``, ``B/`` and ``label/`` folders (LEVIR-CD, WHU-CD layout).

    Args:
        seed: fixes the split of the images when there is no train/val/test layout.
        root: the dataset folder (with A/, B/, label/, or train/, val/ and test/ each holding them).
        tile: cut every image into tiles of this side (e.g. 256 for LEVIR-CD's 1024 x 1024 images).
        val_fraction: share of the images (or tiles) for validation in a seeded split.
        test_fraction: share for test in a seeded split.
    """
    what = "cd-folder"
    path = _resolve(root) if root else None
    if path is None:
        raise ValueError("cd-folder needs data.root, the folder with A/, B/ and label/")
    binary = lambda y: (y > 0).astype(np.int64)  # noqa: E731
    official = _split_parts(path, ["A", "B", "label"], what, seed, val_fraction, test_fraction)
    if official is not None:
        parts = {s: _load(p, ["A", "B"], "label", what, tile, binary) for s, p in official.items()}
    else:
        parts = _seeded(_load(path, ["A", "B"], "label", what, tile, binary), seed, val_fraction, test_fraction, what)
    return _bundle(parts, ["A", "B"], 2, "change-detection", ["unchanged", "change"])


@DATASETS.register("seg-folder")
def seg_folder(
    *,
    seed: int = 0,
    root: str = "",
    modalities: list[str] | None = None,
    num_classes: int | None = None,
    ignore_label: int | None = 255,
    tile: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> DataBundle:
    """Multimodal segmentation from one folder per modality plus ``label/`` (class indices per pixel).

    Args:
        seed: fixes the split of the images when there is no train/val/test layout.
        root: the dataset folder (modality folders and label/, or train/, val/ and test/ each holding them).
        modalities: the modality folders (default: every sub-folder but label/).
        num_classes: number of classes (default: the largest label found + 1).
        ignore_label: label value of unlabelled pixels (default 255), or null.
        tile: cut every image into tiles of this side.
        val_fraction: share of the images (or tiles) for validation in a seeded split.
        test_fraction: share for test in a seeded split.
    """
    what = "seg-folder"
    if not root:
        raise ValueError("seg-folder needs data.root, the folder with one sub-folder per modality and label/")
    path = _resolve(root)
    official = _split_parts(path, [], what, seed, val_fraction, test_fraction)
    first = official["train"] if official is not None else path
    if modalities is None:
        modalities = sorted(p.name for p in first.iterdir() if p.is_dir() and p.name != "label")
    if not modalities:
        raise FileNotFoundError(f"{what}: no modality folders beside label/ under '{first}'")

    def convert(y: np.ndarray) -> np.ndarray:
        return np.where(y == ignore_label, IGNORE_INDEX, y) if ignore_label is not None else y

    if official is not None:
        parts = {s: _load(p, list(modalities), "label", what, tile, convert) for s, p in official.items()}
    else:
        parts = _seeded(_load(path, list(modalities), "label", what, tile, convert), seed, val_fraction, test_fraction, what)
    found = max(int(np.max(np.where(y == IGNORE_INDEX, -1, y))) for _, ys in parts.values() for y in ys)
    classes = num_classes if num_classes is not None else found + 1
    if found >= classes:
        raise ValueError(f"{what}: a label has class {found} but data.num_classes={classes}")
    return _bundle(parts, sorted(modalities), classes, "segmentation", None)


__all__ = ["cd_folder", "read_image", "read_label", "seg_folder"]
