"""``paired-folder``: your own multimodal data as files, one sub-folder per modality, paired by file stem.

Layout (labels from class sub-folders)::

    root/rgb/cat/0001.png   root/depth/cat/0001.npy   root/audio/cat/0001.wav
    root/rgb/dog/0002.png   ...

or flat modality folders and a ``labels.csv`` with columns ``stem,label`` (label names or integers)::

    root/rgb/0001.png   root/depth/0001.npy   root/labels.csv

Images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``) become maps ``(C, H, W)`` in [0, 1]; ``.npy`` arrays
are taken as they are (1-D vectors, 2-D tokens, 3-D maps); ``.wav`` files become log-mel spectrograms
(tokens ``(T, F)``, the ``audio`` extra), cached by content. All files of one modality must have one shape.
A seed fixes a stratified split.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fuselab.data.core import DataBundle, bundle_from_arrays
from fuselab.registry import DATASETS

IMAGE = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
KNOWN = IMAGE | {".npy", ".wav"}


def _files(folder: Path) -> dict[str, tuple[Path, str | None]]:
    """stem -> (file, class folder name or None)."""
    out: dict[str, tuple[Path, str | None]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in KNOWN:
            rel = path.relative_to(folder)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            if path.stem in out:
                raise ValueError(f"two files with the stem '{path.stem}' under {folder}; stems pair the modalities")
            out[path.stem] = (path, label)
    return out


def _load(paths: list[Path], modality: str) -> np.ndarray:
    suffixes = {p.suffix.lower() for p in paths}
    if len(suffixes & IMAGE) and suffixes - IMAGE:
        raise ValueError(f"modality '{modality}' mixes file types ({', '.join(sorted(suffixes))})")
    if suffixes <= IMAGE:
        from PIL import Image

        arrays = []
        for p in paths:
            with Image.open(p) as im:
                a = np.asarray(im, dtype=np.float32) / 255.0
            arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    elif suffixes == {".npy"}:
        arrays = [np.load(p).astype(np.float32) for p in paths]
    elif suffixes == {".wav"}:
        from fuselab.data.audio import MelSpec, log_mels, read_wav

        _, rate = read_wav(paths[0])
        return log_mels(paths, MelSpec(sample_rate=rate), namespace="paired-folder")
    else:
        raise ValueError(f"modality '{modality}' mixes file types ({', '.join(sorted(suffixes))})")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"modality '{modality}' has files of different shapes {sorted(shapes)}; make them equal")
    return np.stack(arrays)


@DATASETS.register("paired-folder")
def paired_folder(
    *,
    seed: int = 0,
    root: str = "",
    modalities: list[str] | None = None,
    labels: str | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
) -> DataBundle:
    """Files paired by stem across modality folders.

    Args:
        root: the folder holding one sub-folder per modality.
        modalities: which sub-folders are modalities (default: every sub-folder).
        labels: a CSV with columns ``stem,label``, relative to ``root`` (default: ``labels.csv`` if present,
            else class sub-folders).
        test_fraction / val_fraction: shares of all samples for test and validation.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"data.root '{root}' is not a folder; it must hold one sub-folder per modality")
    names = modalities or sorted(p.name for p in base.iterdir() if p.is_dir())
    if len(names) < 1:
        raise ValueError(f"data.root '{root}' has no modality sub-folders")
    found = {}
    for m in names:
        if not (base / m).is_dir():
            raise ValueError(f"data.modalities: no folder '{m}' in '{root}'")
        found[m] = _files(base / m)
    stems = sorted(set.intersection(*(set(f) for f in found.values())))
    for m in names:
        unpaired = sorted(set(found[m]) - set(stems))
        if unpaired:
            raise ValueError(f"'{m}/{unpaired[0]}' has no partner in every other modality folder; pair files by stem")
    if not stems:
        raise ValueError(f"no file stem is shared by all modality folders under '{root}'")
    csv_path = base / (labels or "labels.csv")
    if labels is not None or csv_path.is_file():
        with open(csv_path, newline="") as fh:
            table = {row["stem"]: row["label"] for row in csv.DictReader(fh)}
        missing = [s for s in stems if s not in table]
        if missing:
            raise ValueError(f"'{csv_path.name}' has no label for '{missing[0]}'")
        raw = [table[s] for s in stems]
    else:
        raw = [found[names[0]][s][1] for s in stems]
        if any(r is None for r in raw):
            raise ValueError(f"no labels: put files in class sub-folders or add '{root}/labels.csv' (stem,label)")
    classes = sorted(set(raw), key=lambda c: (not str(c).isdigit(), int(c) if str(c).isdigit() else 0, str(c)))
    y = np.array([classes.index(r) for r in raw], dtype=np.int64)
    arrays = {m: _load([found[m][s][0] for s in stems], m) for m in names}
    return bundle_from_arrays(arrays, y, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction,
                              class_names=[str(c) for c in classes])
