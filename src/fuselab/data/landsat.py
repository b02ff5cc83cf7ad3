"""``landsat-cd``: bi-temporal change detection on one scene (two co-registered ENVI images, two sparse masks).

Legend: c bands, h lines, w samples, k folds, t tile side.

A scene is two ENVI images of the same size and bands (``images``: the earlier date first; any pair with a
``.hdr`` or ``.HDR`` header) and two sparse reference masks (``change_mask``, ``unchanged_mask``: images in
which non-zero marks a labelled pixel). Without paths, the Taizhou scene (Landsat 2000 / 2003, 400 x 400, 6
bands; Wu, Du & Zhang, TGRS 2014) is read from ``<data_root>/landsat-cd/taizhou`` (``data_root`` or the
``FUSELAB_DATA`` environment variable).

- Normalisation: each band of each date is standardised over its own scene (no constants of a particular
  scene or sensor), so a model can be evaluated on another Landsat TM scene it never saw.
- Fixed spatial folds: the scene is cut into ``block`` x ``block`` pixel blocks; block (i, j) belongs to
  fold ``(i + 2 j) mod k`` (neighbouring blocks fall into different folds). Fold f is the test fold, fold
  ``f + 1 mod k`` validates (picks the best epoch), the others train. Every labelled pixel is tested exactly
  once over the k folds; the folds do not depend on the seed (seeds vary only the initialisation).
- Training: ``tile`` x ``tile`` windows (step ``tile_stride``) over the whole scene whose labels are those of
  the training blocks only (every other pixel is ``IGNORE_INDEX``); windows without a training label are
  dropped. Validation and test: the whole scene as one sample, labelled only on the validation / test fold's
  pixels, so a model predicts densely and is scored on the held-out labelled pixels.
- ``fold: null`` (default) gives all k folds (``DataBundle.folds``): one run trains each fold and pools
  the test predictions (pooled overall accuracy and Kappa over all labelled pixels); ``fold: f`` gives one.
  The images the model sees are the whole scene in every fold; only the labels are held out.
- ``fold: all`` trains one model on the labelled pixels of every fold but one, which validates (the
  validation slice, fold ``k - 1``); its test split is *every* labelled pixel of the scene, held out or
  not. It is the mode for transfer: train on all of one scene, then score the run on another scene
  (``fuselab evaluate RUN data.images=...``), where every labelled pixel is unseen. Its own test metrics
  are a fit to the training scene, not a held-out estimate.
- Images are ENVI files or GeoTIFFs (``.tif``, read with rasterio, the ``geo`` extra).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
import torch

from fuselab.data.core import IGNORE_INDEX, DataBundle, ModalTensors
from fuselab.data.geo import read_raster
from fuselab.registry import DATASETS

TAIZHOU = ("landsat-cd/taizhou", ("2000TM", "2003TM"), "change.bmp", "unchanged.bmp")
MODALITIES = ("t1", "t2")


def resolve_root(data_root: str | None, what: str) -> Path:
    root = data_root or os.environ.get("FUSELAB_DATA")
    if not root:
        raise FileNotFoundError(
            f"{what}: no data folder; set data.data_root or FUSELAB_DATA to the folder that holds {TAIZHOU[0]}/ "
            "(the Taizhou scene of Wu, Du & Zhang, TGRS 2014), or give data.images and the masks by path"
        )
    return Path(root).expanduser()


def read_mask(path: str | Path, shape: tuple[int, int], what: str) -> np.ndarray:
    """A boolean mask (non-zero = set) from an image file of the given (lines, samples)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landsat-cd: {what} mask '{path}' does not exist")
    with Image.open(path) as image:
        mask = np.asarray(image)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.shape != shape:
        raise ValueError(f"landsat-cd: {what} mask '{path.name}' is {mask.shape[0]} x {mask.shape[1]}, "
                         f"the images are {shape[0]} x {shape[1]}")
    return mask > 0


@functools.lru_cache(maxsize=4)
def read_scene(images: tuple[str, str]) -> np.ndarray:
    """Both dates (ENVI or GeoTIFF) as float32 (2, C, H, W), each band of each date standardised over the scene."""
    cubes = [read_raster(p) for p in images]
    if cubes[0].shape != cubes[1].shape:
        (c1, h1, w1), (c2, h2, w2) = cubes[0].shape, cubes[1].shape
        raise ValueError(f"landsat-cd: the two dates differ in size: '{Path(images[0]).name}' is {c1} bands x {h1} x {w1}, "
                         f"'{Path(images[1]).name}' is {c2} bands x {h2} x {w2}; co-register and crop them to one grid")
    stack = np.stack(cubes).astype(np.float64)
    mean = stack.mean(axis=(2, 3), keepdims=True)
    std = stack.std(axis=(2, 3), keepdims=True)
    return ((stack - mean) / np.maximum(std, 1e-6)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def load_scene(images: tuple[str, str], change_mask: str, unchanged_mask: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both dates as float32 (2, C, H, W) standardised per band over the scene, and the label map (H, W)
    (1 change, 0 unchanged, IGNORE_INDEX unlabelled)."""
    scaled = read_scene(tuple(images))
    shape = scaled.shape[2:]
    change = read_mask(change_mask, shape, "change")
    unchanged = read_mask(unchanged_mask, shape, "unchanged")
    both = int((change & unchanged).sum())
    if both:
        raise ValueError(f"landsat-cd: {both} pixels are marked in both the change and the unchanged mask")
    if not change.any() or not unchanged.any():
        raise ValueError("landsat-cd: the change and the unchanged mask must each mark at least one pixel")
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    labels[unchanged] = 0
    labels[change] = 1
    return scaled, labels, np.asarray(shape)


def block_folds(shape: tuple[int, int], block: int, folds: int) -> np.ndarray:
    """Fold index (H, W) of every pixel: block (i, j) of side ``block`` is in fold ``(i + 2 j) mod folds``."""
    rows = np.arange(shape[0]) // block
    cols = np.arange(shape[1]) // block
    return (rows[:, None] + 2 * cols[None, :]) % folds


def window_starts(size: int, tile: int, stride: int) -> list[int]:
    """Window offsets covering ``size`` (the last window ends at the border)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def scene_tiles(scene: torch.Tensor, labels: torch.Tensor, tile: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of (M, C, H, W) images and (H, W) labels -> (N, M, C, t, t) and (N, t, t); windows without a
    label are dropped."""
    h, w = labels.shape
    tiles, tile_labels = [], []
    for r in window_starts(h, tile, stride):
        for c in window_starts(w, tile, stride):
            y = labels[r : r + tile, c : c + tile]
            if (y != IGNORE_INDEX).any():
                tiles.append(scene[..., r : r + tile, c : c + tile])
                tile_labels.append(y)
    if not tiles:
        raise ValueError("landsat-cd: no training window holds a training label; use smaller data.block or more folds")
    return torch.stack(tiles), torch.stack(tile_labels)


def fold_bundle(scene: torch.Tensor, labels: torch.Tensor, fold_map: torch.Tensor, fold: int | None, folds: int,
                tile: int, tile_stride: int, augment: bool = False, names: tuple[str, ...] = MODALITIES) -> DataBundle:
    """The bundle of one fold: training windows, the whole scene for validation and test. ``fold=None`` is
    the ``all`` mode: fold k - 1 validates, the others train, and every labelled pixel is the test split."""
    val_fold = (fold + 1) % folds if fold is not None else folds - 1

    def only(mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, labels, torch.full_like(labels, IGNORE_INDEX))

    train_labels = only((fold_map != fold) & (fold_map != val_fold)) if fold is not None else only(fold_map != val_fold)
    x, y = scene_tiles(scene, train_labels, tile, tile_stride)
    whole = {m: scene[i].unsqueeze(0) for i, m in enumerate(names)}
    for part, f in (("test", fold), ("validation", val_fold)):
        if f is not None and not (only(fold_map == f) != IGNORE_INDEX).any():
            raise ValueError(f"landsat-cd: fold {f} ({part}) holds no labelled pixel; use a smaller data.block or fewer folds")
    test = labels if fold is None else only(fold_map == fold)
    return DataBundle(
        train=ModalTensors({m: x[:, i].contiguous() for i, m in enumerate(names)}, y, "dihedral" if augment else None),
        val=ModalTensors(whole, only(fold_map == val_fold).unsqueeze(0)),
        test=ModalTensors(whole, test.unsqueeze(0)),
        dims={m: int(scene.shape[1]) for m in names},
        num_classes=2,
        forms={m: "map" for m in names},
        class_names=["unchanged", "change"],
        task="change-detection",
        test_in_sample=fold is None,
    )


def scene_paths(images: list[str] | None, data_root: str | None,
                masks: tuple[str | None, str | None] = (None, None)) -> tuple[list[str], tuple[str | None, str | None]]:
    """The two image paths and the two mask paths of a scene: the Taizhou scene under ``data_root`` when
    ``images`` is None, else ``images`` and ``masks`` (relative paths under ``data_root``)."""
    if images is None:
        base = resolve_root(data_root, "landsat-cd") / TAIZHOU[0]
        if not base.is_dir():
            raise FileNotFoundError(f"landsat-cd: '{base}' does not exist; put the Taizhou scene there "
                                    "(2000TM, 2003TM with .HDR headers, change.bmp, unchanged.bmp)")
        return [str(base / n) for n in TAIZHOU[1]], (str(base / TAIZHOU[2]), str(base / TAIZHOU[3]))
    if isinstance(images, str) or len(images) != 2:
        raise ValueError(f"data.images must list two images (ENVI or GeoTIFF, earlier date first), got {images!r}")
    root = Path(data_root).expanduser() if data_root else None
    place = lambda p: str(root / p) if root is not None and not Path(p).is_absolute() else str(Path(p).expanduser())  # noqa: E731
    return [place(p) for p in images], tuple(None if m is None else place(m) for m in masks)  # type: ignore[return-value]


def scene_modalities(scaled: np.ndarray, difference: bool = False) -> tuple[torch.Tensor, tuple[str, ...]]:
    """(2, C, H, W) standardised dates -> the stacked modalities (M, C, H, W) and their names (``diff`` last)."""
    scene = torch.from_numpy(scaled)
    if difference:
        return torch.cat([scene, (scene[1] - scene[0]).unsqueeze(0)]), (*MODALITIES, "diff")
    return scene, MODALITIES


def scene_input(*, images: list[str] | None = None, data_root: str | None = None, difference: bool = False,
                **_: object) -> dict[str, torch.Tensor]:
    """A whole scene as one model input ``{modality: (1, C, H, W)}``, without reference masks (for
    prediction on a scene nobody labelled). Takes a ``landsat-cd`` data section; other keys are ignored."""
    paths, _masks = scene_paths(images, data_root)
    scene, names = scene_modalities(read_scene((paths[0], paths[1])), difference)
    return {m: scene[i].unsqueeze(0) for i, m in enumerate(names)}


@DATASETS.register("landsat-cd")
def landsat_cd(
    *,
    seed: int = 0,
    images: list[str] | None = None,
    change_mask: str | None = None,
    unchanged_mask: str | None = None,
    data_root: str | None = None,
    folds: int = 5,
    fold: int | str | None = None,
    block: int = 40,
    tile: int = 32,
    tile_stride: int = 16,
    augment: bool = True,
    difference: bool = False,
) -> DataBundle:
    """A bi-temporal Landsat scene with fixed spatial folds (see the module docstring).

    Args:
        seed: not used by the data (the folds are fixed); it seeds only the model and the batch order.
        images: the two ENVI images, earlier date first (default: the Taizhou scene under ``data_root``).
        change_mask: image marking changed reference pixels (non-zero); relative paths are under ``data_root``.
        unchanged_mask: image marking unchanged reference pixels.
        data_root: folder holding ``landsat-cd/taizhou`` (default: the ``FUSELAB_DATA`` environment variable).
        folds: k, the number of spatial folds (>= 3: one tests, one validates, the rest train).
        fold: the test fold 0..k-1, None for all folds in one run (pooled metrics), or ``"all"``: one model
            trained on every fold but the validation fold k - 1, tested on every labelled pixel (for transfer).
        block: side of the square blocks (pixels) that are assigned to folds.
        tile: side of the training windows.
        tile_stride: step between training windows.
        augment: a random rotation / flip per training batch (the 8 symmetries of the square).
        difference: add a third modality ``diff``, the later minus the earlier date (standardised images), for
            three-stream models such as CEN with three modalities.
    """
    for key, value, least in (("folds", folds, 3), ("block", block, 1), ("tile", tile, 4), ("tile_stride", tile_stride, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"data.{key} must be an integer >= {least}, got {value!r}")
    if fold == "all":
        fold = -1  # fold_bundle's "all" mode is fold=None
    elif fold is not None and (isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds):
        raise ValueError(f"data.fold must be null (all folds), 'all' (one model on every fold) or 0..{folds - 1}, got {fold!r}")
    given = [images is not None, change_mask is not None, unchanged_mask is not None]
    if any(given) and not all(given):
        raise ValueError("landsat-cd: give data.images, data.change_mask and data.unchanged_mask together "
                         "(or none of them for the Taizhou scene)")
    paths, (change_mask, unchanged_mask) = scene_paths(images, data_root, (change_mask, unchanged_mask))
    scaled, labels, shape = load_scene((paths[0], paths[1]), change_mask, unchanged_mask)
    scene, names = scene_modalities(scaled, difference)
    label_map = torch.from_numpy(labels)
    fold_map = torch.from_numpy(block_folds(tuple(shape), block, folds))
    make = lambda f: fold_bundle(scene, label_map, fold_map, f, folds, tile, tile_stride, augment, names)  # noqa: E731
    if fold is not None:
        return make(None if fold == -1 else fold)
    bundles = [make(f) for f in range(folds)]
    return dataclasses.replace(bundles[0], folds=bundles)


__all__ = ["block_folds", "fold_bundle", "landsat_cd", "load_scene", "read_mask", "read_scene", "scene_input", "scene_paths",
           "scene_tiles", "window_starts"]
