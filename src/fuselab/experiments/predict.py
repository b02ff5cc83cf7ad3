"""Predictions of a finished run that a user can open: ``fuselab predict RUN --out DIR [key=value ...]``.

Legend: n samples, k classes, h lines, w samples (columns) of a scene.

- Vector and token data: ``predictions.csv``, one row per sample of the chosen split (``test`` by default)
  with its index, reference label, predicted class and one probability column per class.
- Change detection (``landsat-cd``): the whole scene named by the run's data section (or the overrides:
  ``data.images=[a,b]``; reference masks are not needed) is predicted at once:
  ``change_map.png`` (white = change), ``change_probability.npy`` (h, w), and, when the first image is
  georeferenced (ENVI ``map info`` or a GeoTIFF), ``change_map.tif`` (uint8, 1 = change) and
  ``change_probability.tif`` (float32) on the input's grid, written with rasterio (the ``geo`` extra).
- Other dense data: one PNG of the predicted class map per sample of the split.

Probabilities are the mean of every fold model's softmax (fold ensemble) unless ``fold`` picks one model
(``fuselab.train.session.LoadedRun``).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from fuselab.data.core import IGNORE_INDEX, DataBundle, ModalTensors
from fuselab.errors import ConfigError
from fuselab.train.session import LoadedRun, load_run_on, read_run_config

SPLITS = ("train", "val", "test")
SCENE_DATASETS = ("landsat-cd",)  # datasets whose input is one whole scene, predicted without its reference masks


@dataclasses.dataclass
class PredictResult:
    """What ``predict_run`` wrote (``files`` by kind) and how many samples or pixels it predicted."""

    files: dict[str, Path]
    count: int
    task: str
    georeferenced: bool = False


def scene_bundle(x: dict[str, Tensor], *, num_classes: int = 2, task: str = "change-detection") -> DataBundle:
    """A bundle holding one unlabelled scene ``{m: (1, C, h, w)}`` in every split: what a model builder needs to
    know (widths, classes, task) without reference masks."""
    first = next(iter(x.values()))
    empty = torch.full((1, *first.shape[-2:]), IGNORE_INDEX, dtype=torch.long)
    split = ModalTensors(x, empty)
    return DataBundle(train=split, val=split, test=split, dims={m: int(v.shape[1]) for m, v in x.items()},
                      num_classes=num_classes, forms={m: "map" for m in x}, task=task,
                      class_names=["unchanged", "change"] if task == "change-detection" else None)


def _check_fold(run: LoadedRun, fold: int | None) -> None:
    if fold is not None and not 0 <= fold < len(run.models):
        raise ConfigError(f"--fold {fold}: run '{run.path.name}' has {len(run.models)} fold model(s), 0..{len(run.models) - 1}")


def write_change_png(path: Path, change: np.ndarray) -> Path:
    """A change map (h, w) of 0 / 1 as a black (unchanged) and white (change) PNG."""
    from PIL import Image

    Image.fromarray((np.asarray(change) > 0).astype(np.uint8) * 255, mode="L").save(path)
    return path


def predict_scene(run_dir: str | Path, out: str | Path, overrides: Sequence[str] = (), *, fold: int | None = None,
                  device: str = "cpu", trust: bool = False) -> PredictResult:
    """Change map of the whole scene of a ``landsat-cd`` run (see the module docstring)."""
    from fuselab.data.geo import read_georef, require_rasterio
    from fuselab.data.landsat import scene_input, scene_paths

    cfg = read_run_config(run_dir, overrides)
    options = OmegaConf.to_container(cfg.data, resolve=True)
    options.pop("name")
    paths, _ = scene_paths(options.get("images"), options.get("data_root"))
    georef = read_georef(paths[0])
    if georef is not None:
        require_rasterio(f"the input '{Path(paths[0]).name}' is georeferenced; its GeoTIFF output")
    x = scene_input(**options)
    run = load_run_on(run_dir, overrides, data=scene_bundle(x), device=device, trust=trust)
    _check_fold(run, fold)
    proba = run.predict_proba(x, fold=fold)[0]  # (k, h, w)
    change = proba.argmax(0).numpy().astype(np.uint8)
    p_change = proba[1].numpy().astype(np.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"png": write_change_png(out / "change_map.png", change)}
    np.save(out / "change_probability.npy", p_change)
    files["npy"] = out / "change_probability.npy"
    if georef is not None:
        from fuselab.data.geo import write_geotiff

        files["geotiff"] = write_geotiff(out / "change_map.tif", change, georef)
        files["probability_geotiff"] = write_geotiff(out / "change_probability.tif", p_change, georef)
    return PredictResult(files, int(change.size), "change-detection", georef is not None)


def predict_split(run_dir: str | Path, out: str | Path, overrides: Sequence[str] = (), *, split: str = "test",
                  fold: int | None = None, device: str = "cpu", trust: bool = False) -> PredictResult:
    """Class probabilities of every sample of a split as CSV (vectors, tokens), or a PNG per sample of a dense
    task's predicted class map."""
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'")
    run = load_run_on(run_dir, overrides, device=device, trust=trust)
    _check_fold(run, fold)
    data = run.data
    part: ModalTensors = getattr(data, split)
    proba = run.predict_proba(part.x, fold=fold).cpu()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data.task != "classification":
        from PIL import Image

        files = {}
        classes = proba.argmax(1).numpy()
        scale = 255 // max(1, data.num_classes - 1)
        for i, c in enumerate(classes):
            files[f"png{i}"] = out / f"{split}_{i:04d}.png"
            Image.fromarray((c * scale).astype(np.uint8), mode="L").save(files[f"png{i}"])
        return PredictResult(files, int(classes.size), data.task)
    names = [str(c) for c in (data.class_names or range(data.num_classes))]
    path = out / "predictions.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample", "label", "predicted", *[f"p_{n}" for n in names]])
        pred = proba.argmax(1)
        for i in range(len(proba)):
            writer.writerow([i, int(part.y[i]), int(pred[i]), *(f"{float(p):.6g}" for p in proba[i])])
    return PredictResult({"csv": path}, len(proba), data.task)


def predict_run(run_dir: str | Path, out: str | Path, overrides: Sequence[str] = (), *, split: str = "test",
                fold: int | None = None, device: str = "cpu", trust: bool = False) -> PredictResult:
    """``fuselab predict``: a whole scene for scene datasets, else the samples of ``split``."""
    cfg = read_run_config(run_dir, overrides)
    if str(cfg.data.name) in SCENE_DATASETS:
        return predict_scene(run_dir, out, overrides, fold=fold, device=device, trust=trust)
    return predict_split(run_dir, out, overrides, split=split, fold=fold, device=device, trust=trust)


def describe(result: PredictResult) -> list[str]:
    """Lines for the command's output: what was written where."""
    what = "pixels" if result.task != "classification" else "samples"
    lines = [f"{result.count:,} {what} predicted"]
    lines += [f"{kind}: {path}" for kind, path in result.files.items() if not kind.startswith("png") or kind == "png"]
    extra = [k for k in result.files if k.startswith("png") and k != "png"]
    if extra:
        lines.append(f"{len(extra)} PNG maps in {result.files[extra[0]].parent}")
    return lines


__all__ = ["PredictResult", "describe", "predict_run", "predict_scene", "predict_split", "scene_bundle", "write_change_png"]
