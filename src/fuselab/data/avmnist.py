"""AV-MNIST: MNIST images paired with Free Spoken Digit (FSDD) recordings of the same digit.

This is how AV-MNIST is built (Vielzeuf et al., CentralNet, 2018; MultiBench, Liang et al., 2021): every
sample is one handwritten digit image and one spoken recording of the same digit, the label is that digit.
It reads the formats users have on disk, under ``data_root`` (default ``$FUSELAB_DATA``):

- ``mnist/``: the four MNIST IDX files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
  ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``; gzipped or not);
- ``fsdd/recordings/`` (or ``fsdd/``): FSDD's ``{digit}_{speaker}_{index}.wav`` files, 8 kHz mono.

Pairing, for a seed: train and validation images are drawn from MNIST's 60,000 training images, test images
are MNIST's 10,000 test images (all of them by default); each image of digit d is paired with a recording of
digit d drawn at random (seeded). Train and validation pairs use only FSDD's official training recordings
(index 5-49), test pairs only its official test recordings (index 0-4), so no recording is in both training
and test. Validation pairs use recordings 5-9 and training pairs 10-49, so that validation (model selection)
also sees recordings the model has not been trained on; without that, a model that memorises its training
recordings (easy: each is in many pairs) looks far better on validation than on test. A recording appears in
many pairs (FSDD has 300 per digit, MNIST about 6,000 images per digit).

Modalities: ``image`` ``(N, 1, 28, 28)`` (form ``map``) and ``audio``, a log-mel spectrogram ``(N, 64, 32)``
(64 frames of 16 ms x 32 mel bins, form ``tokens``: a sequence of frame vectors), computed once per set of
recordings and cached by content hash (``fuselab.data.audio``). Each modality is standardised with one mean
and one standard deviation of its training split.

Variants:

- ``clean``: the images and recordings as they are.
- ``hard``: both modalities degraded so that neither is enough on its own, in the spirit of MultiBench's
  AV-MNIST (images with 75 % of their PCA energy removed, noise added to the audio). What it does exactly:
  a PCA is fitted on all 60,000 MNIST training images (pixels in [0, 1], centred); every image is replaced by
  its reconstruction from the fewest leading components whose explained variance reaches ``image_energy``
  (0.25: the remaining 75 % of the variance is removed; this keeps 4 components of MNIST's 784); and white
  Gaussian noise at ``audio_snr_db`` dB signal-to-noise ratio (signal power = the recording's mean square) is
  added to every waveform before the spectrogram, drawn once per recording from a fixed seed. It is **not**
  MultiBench's file (that one is distributed as preprocessed arrays; its noise and spectrogram settings
  differ), so its accuracies are not comparable with MultiBench's numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import re
from pathlib import Path

import numpy as np
import torch

from fuselab.data.audio import MelSpec, log_mels
from fuselab.data.core import DataBundle, ModalTensors
from fuselab.registry import DATASETS

MODALITIES = ("audio", "image")
VARIANTS = ("clean", "hard")
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FSDD_NAME = re.compile(r"^(\d)_([^_]+)_(\d+)\.wav$")
FSDD_TEST_INDICES = range(0, 5)  # FSDD's official split: recordings 0-4 of each speaker and digit are test
FSDD_VAL_INDICES = range(5, 10)  # from FSDD's training recordings, held out of training pairs for validation
MEL = MelSpec()

MISSING = (
    "avmnist data not found {where}: download the four MNIST IDX files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, "
    "http://yann.lecun.com/exdb/mnist/) into <data root>/mnist and the Free Spoken Digit recordings "
    "(the recordings/ folder of https://github.com/Jakobovski/free-spoken-digit-dataset) into "
    "<data root>/fsdd/recordings, then set data.data_root or FUSELAB_DATA to <data root>"
)


def resolve_root(data_root: str | None) -> Path:
    """``data_root``, else ``$FUSELAB_DATA``; a one-line error saying what to download when neither is set."""
    root = data_root or os.environ.get("FUSELAB_DATA")
    if not root:
        raise FileNotFoundError(MISSING.format(where="(no data.data_root and no FUSELAB_DATA)"))
    return Path(root).expanduser()


def _mnist_file(root: Path, stem: str) -> Path:
    for candidate in (root / "mnist" / f"{stem}.gz", root / "mnist" / stem, root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(MISSING.format(where=f"under {root}"))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format; gzipped or not) as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, got {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


@functools.lru_cache(maxsize=4)
def _load_mnist(
    paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, (images, labels) in zip(MNIST_FILES, zip(paths[0::2], paths[1::2])):
        x, y = read_idx(Path(images)), read_idx(Path(labels)).astype(np.int64)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"MNIST {split}: images {x.shape} and labels {y.shape} do not match")
        out[split] = (x, y)
    return out


def load_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images (N, 28, 28) uint8, labels (N,)), "test": ...}``, memoised per file state."""
    paths = tuple(str(_mnist_file(root, stem)) for split in MNIST_FILES for stem in MNIST_FILES[split])
    stamps = tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)
    return _load_mnist(paths, stamps)


def list_fsdd(root: Path) -> tuple[list[Path], np.ndarray, np.ndarray, list[str]]:
    """FSDD recordings sorted by name: paths, digits, recording indices, speakers."""
    folder = next((f for f in (root / "fsdd" / "recordings", root / "fsdd", root / "recordings") if f.is_dir()), None)
    if folder is None:
        raise FileNotFoundError(MISSING.format(where=f"under {root}"))
    entries = []
    for path in sorted(folder.iterdir()):
        match = FSDD_NAME.match(path.name)
        if match:
            entries.append((path, int(match.group(1)), int(match.group(3)), match.group(2)))
    if not entries:
        raise FileNotFoundError(MISSING.format(where=f"under {root}"))
    paths, digits, indices, speakers = zip(*entries)
    return list(paths), np.array(digits), np.array(indices), list(speakers)


_PCA: dict[tuple[int, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def pca_basis(fit_on: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean (784,) and the fewest leading principal directions (784, k) of the images ``fit_on`` (pixels in
    [0, 1]) whose explained variance reaches ``energy``; memoised per array."""
    key = (id(fit_on), float(energy))
    if key in _PCA and _PCA[key][0] is fit_on:
        return _PCA[key][1], _PCA[key][2]
    x = fit_on.reshape(len(fit_on), -1).astype(np.float32) / 255.0
    mean = x.mean(0)
    xc = x - mean
    cov = (xc.T @ xc).astype(np.float64) / len(x)
    values, vectors = np.linalg.eigh(cov)
    values, vectors = values[::-1], vectors[:, ::-1]
    k = int(np.searchsorted(np.cumsum(values) / values.sum(), energy) + 1)
    basis = np.ascontiguousarray(vectors[:, :k], dtype=np.float32)
    _PCA[key] = (fit_on, mean, basis)
    return mean, basis


def pca_keep(images: np.ndarray, fit_on: np.ndarray, energy: float) -> np.ndarray:
    """Images (uint8) as float32 in [0, 1] reconstructed from the fewest leading PCA components (fitted on
    ``fit_on``) whose explained variance reaches ``energy``."""
    mean, basis = pca_basis(fit_on, energy)
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return ((x - mean) @ basis @ basis.T + mean).reshape(images.shape)


def _pick(rng: np.random.Generator, labels: np.ndarray, pool: dict[int, np.ndarray]) -> np.ndarray:
    """For each label d, one index drawn at random from ``pool[d]``."""
    out = np.empty(len(labels), dtype=np.int64)
    for d in np.unique(labels):
        where = np.flatnonzero(labels == d)
        if d not in pool or not len(pool[d]):
            raise ValueError(f"avmnist: no FSDD recording of digit {d} for this split")
        out[where] = rng.choice(pool[d], size=len(where))
    return out


SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Pairs:
    """The AV-MNIST pairs of one seed, per split (``train``, ``val``, ``test``).

    ``image[p]`` indexes MNIST's training images (train, val) or test images (test); ``recording[p]``
    indexes ``recordings`` (FSDD's files sorted by name); ``label[p]`` is the digit of both.
    """

    image: dict[str, np.ndarray]
    recording: dict[str, np.ndarray]
    label: dict[str, np.ndarray]
    recordings: list[Path]
    recording_digit: np.ndarray
    recording_index: np.ndarray


def make_pairs(
    root: Path, seed: int, *, train_size: int, val_size: int, test_size: int | None
) -> Pairs:
    """Draw the pairs of one seed (see the module documentation)."""
    mnist = load_mnist(root)
    train_labels, test_labels = mnist["train"][1], mnist["test"][1]
    if train_size + val_size > len(train_labels):
        raise ValueError(f"data.train_size + data.val_size must be at most {len(train_labels)}, "
                         f"got {train_size} + {val_size}")
    rng = np.random.default_rng([seed, 0xA5])
    order = rng.permutation(len(train_labels))
    image = {"train": order[:train_size], "val": order[train_size : train_size + val_size]}
    if test_size is None:
        image["test"] = np.arange(len(test_labels))
    else:
        if isinstance(test_size, bool) or not isinstance(test_size, int) or not 1 <= test_size <= len(test_labels):
            raise ValueError(f"data.test_size must be in 1..{len(test_labels)} or null (all), got {test_size!r}")
        image["test"] = np.sort(rng.permutation(len(test_labels))[:test_size])
    label = {p: (test_labels if p == "test" else train_labels)[image[p]] for p in SPLITS}
    paths, digits, indices, _ = list_fsdd(root)
    part = np.where(np.isin(indices, FSDD_VAL_INDICES), "val", "train")
    part[np.isin(indices, FSDD_TEST_INDICES)] = "test"
    recording = {p: _pick(rng, label[p], {d: np.flatnonzero((digits == d) & (part == p)) for d in range(10)})
                 for p in SPLITS}
    return Pairs(image, recording, label, paths, digits, indices)


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mean, std = float(train.mean()), float(train.std()) or 1.0
    return [torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in (train, *others)]


@DATASETS.register("avmnist")
def avmnist(
    *,
    seed: int = 0,
    variant: str = "clean",
    modalities: list[str] | None = None,
    train_size: int = 3000,
    val_size: int = 1000,
    test_size: int | None = None,
    image_energy: float = 0.25,
    audio_snr_db: float = -6.0,
    data_root: str | None = None,
) -> DataBundle:
    """MNIST images paired with FSDD recordings of the same digit (AV-MNIST), split for one seed.

    Args:
        seed: fixes which MNIST training images form train and validation and which recording each image is
            paired with (FSDD recordings 10-49 for train, 5-9 for validation, 0-4 for test); test images
            are all of MNIST's test set unless ``test_size``.
        variant: ``clean``, or ``hard`` (PCA-reduced images, noisy audio; see the module documentation).
        modalities: which of ``audio`` and ``image`` to return (default both); one modality gives a unimodal
            dataset (a model then runs without fusion).
        train_size: training pairs (up to 60,000 - ``val_size``), drawn from MNIST's training images.
        val_size: validation pairs (for early stopping / model selection), disjoint from the training images.
        test_size: test pairs (default: all 10,000 MNIST test images; fewer are a seeded random subset).
        image_energy: ``hard``: share of the PCA variance kept in the images (0.25 removes 75 %).
        audio_snr_db: ``hard``: signal-to-noise ratio in dB of the white noise added to the recordings.
        data_root: a folder holding ``mnist/`` and ``fsdd/recordings/``; default ``$FUSELAB_DATA``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"data.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    modalities = list(MODALITIES) if modalities is None else list(modalities)
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"data.modalities must name distinct modalities among {', '.join(MODALITIES)}, "
                         f"got {modalities}")
    for key, value, low in (("train_size", train_size, 1), ("val_size", val_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"data.{key} must be a positive integer, got {value!r}")
    if not 0.0 < image_energy <= 1.0:
        raise ValueError(f"data.image_energy must be in (0, 1], got {image_energy}")

    root = resolve_root(data_root)
    pairs = make_pairs(root, seed, train_size=train_size, val_size=val_size, test_size=test_size)
    x: dict[str, dict[str, torch.Tensor]] = {p: {} for p in SPLITS}
    if "image" in modalities:
        mnist = load_mnist(root)
        parts = {p: mnist["test" if p == "test" else "train"][0][pairs.image[p]] for p in SPLITS}
        if variant == "hard":
            arrays = [pca_keep(parts[p], mnist["train"][0], image_energy) for p in SPLITS]
        else:
            arrays = [parts[p].astype(np.float32) / 255.0 for p in SPLITS]
        for p, t in zip(SPLITS, _standardize(*arrays)):
            x[p]["image"] = t.unsqueeze(1).contiguous()
    if "audio" in modalities:
        mel = dataclasses.replace(MEL, snr_db=float(audio_snr_db)) if variant == "hard" else MEL
        features = log_mels(pairs.recordings, mel, namespace="fsdd")
        for p, t in zip(SPLITS, _standardize(*(features[pairs.recording[p]] for p in SPLITS))):
            x[p]["audio"] = t.contiguous()

    def split(p: str) -> ModalTensors:
        return ModalTensors(x[p], torch.from_numpy(pairs.label[p]).contiguous())

    shapes = {"image": (1, 28, 28), "audio": (MEL.frames, MEL.n_mels)}
    forms = {"image": "map", "audio": "tokens"}
    return DataBundle(
        train=split("train"),
        val=split("val"),
        test=split("test"),
        dims={m: shapes[m] for m in modalities},
        num_classes=10,
        forms={m: forms[m] for m in modalities},
        class_names=[str(d) for d in range(10)],
    )
