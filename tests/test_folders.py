"""cd-folder and seg-folder on small generated folders: layouts, splits, a short real run each, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fuselab.data.core import IGNORE_INDEX
from fuselab.data.folders import cd_folder, seg_folder
from fuselab.train.config import make_config
from fuselab.train.run import execute


def _cd_folder(root, n=6, size=24, seed=0):
    """Pairs of RGB images; the second date has a bright square where the label says change."""
    rng = np.random.default_rng(seed)
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = rng.integers(40, 90, size=(size, size, 3), dtype=np.uint8)
        b = np.clip(a.astype(int) + rng.integers(-5, 6, size=a.shape), 0, 255).astype(np.uint8)
        label = np.zeros((size, size), dtype=np.uint8)
        r, c = rng.integers(0, size - 8, size=2)
        b[r : r + 8, c : c + 8] = 220
        label[r : r + 8, c : c + 8] = 255
        Image.fromarray(a).save(root / "A" / f"img{i}.png")
        Image.fromarray(b).save(root / "B" / f"img{i}.png")
        Image.fromarray(label).save(root / "label" / f"img{i}.png")
    return root


def _seg_folder(root, n=6, size=24, seed=0):
    """RGB + 16-bit depth; class 1 where the depth is near, class 2 where red, unlabelled border (255)."""
    rng = np.random.default_rng(seed)
    for sub in ("rgb", "depth", "label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
        depth = np.full((size, size), 5000, dtype=np.uint16)
        label = np.zeros((size, size), dtype=np.uint8)
        r, c = rng.integers(2, size - 10, size=2)
        depth[r : r + 8, c : c + 8] = 800
        label[r : r + 8, c : c + 8] = 1
        rgb[:6, :6, 0] = 250
        label[:6, :6] = 2
        label[-1, :] = 255
        Image.fromarray(rgb).save(root / "rgb" / f"s{i}.png")
        Image.fromarray(depth).save(root / "depth" / f"s{i}.png")
        Image.fromarray(label).save(root / "label" / f"s{i}.png")
    return root


def test_cd_folder_seeded_split_and_tiles(tmp_path):
    root = _cd_folder(tmp_path / "cd", n=10)
    bundle = cd_folder(root=str(root), seed=1)
    assert bundle.task == "change-detection" and bundle.dims == {"A": 3, "B": 3}
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 10
    assert set(bundle.train.y.unique().tolist()) == {0, 1}
    tiled = cd_folder(root=str(root), tile=16)
    assert tiled.train.x["A"].shape[-2:] == (16, 16)
    assert len(tiled.train) + len(tiled.val) + len(tiled.test) == 10 * 4  # 24 px -> 2 x 2 tiles of 16


def test_cd_folder_official_split(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        _cd_folder(tmp_path / "levir" / split, n=n, seed=len(split))
    bundle = cd_folder(root=str(tmp_path / "levir"))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (4, 2, 3)


CD_RUN = {
    "model": {"name": "conv-streams", "widths": [8, 16], "shared_weights": True, "fuse_at": "all"},
    "fusion": {"name": "abs-diff"},
    "loss": {"terms": [{"name": "dense-ce"}]},
    "train": {"epochs": 8, "batch_size": 4, "lr": 1.0e-2, "threads": 1},
}


def test_cd_folder_short_run_learns(tmp_path):
    root = _cd_folder(tmp_path / "cd", n=12)
    cfg = make_config({**CD_RUN, "data": {"name": "cd-folder", "root": str(root)}})
    m = execute(cfg).metrics
    assert m["test_kappa"] > 0.5 and m["test_iou_change"] > 0.4, m


def test_seg_folder_ignore_label_and_miou_run(tmp_path):
    root = _seg_folder(tmp_path / "seg", n=10)
    bundle = seg_folder(root=str(root))
    assert bundle.task == "segmentation" and bundle.dims == {"depth": 1, "rgb": 3} and bundle.num_classes == 3
    assert (bundle.train.y[:, -1] == IGNORE_INDEX).all()
    cfg = make_config({**CD_RUN, "data": {"name": "seg-folder", "root": str(root)},
                       "model": {"name": "conv-streams", "widths": [8, 16], "fuse_at": "all"},
                       "fusion": {"name": "concat"}})
    m = execute(cfg).metrics
    assert "test_miou" in m and m["test_miou"] > 0.4, m


def _one_line(exc) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_unequal_sizes_between_modalities_is_one_line(tmp_path):
    root = _seg_folder(tmp_path / "seg", n=3)
    Image.fromarray(np.zeros((20, 24), dtype=np.uint16)).save(root / "depth" / "s1.png")
    with pytest.raises(ValueError) as exc:
        seg_folder(root=str(root))
    assert "unequal sizes between modalities" in _one_line(exc) and "'s1'" in str(exc.value)


def test_a_missing_file_is_one_line(tmp_path):
    root = _cd_folder(tmp_path / "cd", n=3)
    (root / "label" / "img2.png").unlink()
    with pytest.raises(FileNotFoundError) as exc:
        cd_folder(root=str(root))
    assert "'img2' has no file in label/" in _one_line(exc)


def test_missing_root_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        cd_folder(root=str(tmp_path / "nowhere"))
    assert "is not a folder" in _one_line(exc)
