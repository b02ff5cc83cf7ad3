"""Your own data and backbone: a tensors file, an encoder by import path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fuselab.data.tensors import tensors
from fuselab.train.config import ConfigError, make_config
from fuselab.train.run import execute


class TinyCNN(torch.nn.Module):
    """An encoder a user might write: maps (B, 1, 8, 8) to staged outputs, the last (B, 12)."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, width)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return [h, self.fc(h.flatten(1))]


def _make_file(tmp_path, suffix=".npz"):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 60)
    image = rng.normal(size=(180, 1, 8, 8)).astype(np.float32)
    image[np.arange(180), 0, 2 * y, 2 * y] += 4.0  # a class-dependent pixel
    vec = rng.normal(size=(180, 5)).astype(np.float32) + y[:, None] * 2.0
    path = tmp_path / f"mine{suffix}"
    if suffix == ".npz":
        np.savez(path, image=image, vec=vec, y=y)
    else:
        torch.save({"image": torch.from_numpy(image), "vec": torch.from_numpy(vec), "y": torch.from_numpy(y)}, path)
    return path


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_tensors_file_forms_split_and_standardisation(tmp_path, suffix):
    b = tensors(path=str(_make_file(tmp_path, suffix)), seed=1)
    assert b.forms == {"image": "map", "vec": "vector"} and b.dims == {"image": 1, "vec": 5}
    assert b.num_classes == 3 and (len(b.train), len(b.val), len(b.test)) == (126, 18, 36)
    assert torch.allclose(b.train.x["vec"].mean(0), torch.zeros(5), atol=1e-5)
    assert torch.bincount(b.test.y).tolist() == [12, 12, 12]


def test_tensors_bad_input(tmp_path):
    path = _make_file(tmp_path)
    with pytest.raises(ValueError, match="no array 'audio'"):
        tensors(path=str(path), modalities=["audio"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tensors(path=str(tmp_path / "none.npz"))


def test_import_path_encoder_on_a_tensors_file_learns(tmp_path):
    path = _make_file(tmp_path)
    base = {
        "data": {"name": "tensors", "path": str(path)},
        "model": {"name": "custom-streams", "encoders": {
            "image": {"target": f"{__name__}.TinyCNN", "width": 12},
            "vec": {"target": "torch.nn.Identity"},
        }},
        "fusion": {"name": "concat"},
        "train": {"epochs": 30, "batch_size": 32, "lr": 5.0e-3, "threads": 1},
    }
    result = execute(make_config(base))
    assert result.metrics["test_accuracy"] > 0.8  # chance is 1/3
    model_keys = result.fit.state_dict.keys()
    assert any(k.startswith("encoders.image.encoder.conv") for k in model_keys)


def test_bad_encoder_target_is_one_clear_error(tmp_path):
    base = {"data": {"name": "tensors", "path": str(_make_file(tmp_path))},
            "model": {"name": "custom-streams", "encoders": {"*": {"target": "mypkg.nets.Missing"}}}}
    with pytest.raises(ConfigError, match="encoder target 'mypkg.nets.Missing': cannot import 'mypkg.nets'"):
        execute(make_config(base))


def _paired(tmp_path, with_csv: bool):
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "pairs"
    for i in range(60):
        label = i % 3
        sub = "" if with_csv else f"class{label}/"
        (root / "rgb" / sub).mkdir(parents=True, exist_ok=True)
        (root / "depth" / sub).mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((6, 6, 3)) * 60 + label * 80).astype(np.uint8)
        Image.fromarray(pixels).save(root / "rgb" / sub / f"s{i:03d}.png")
        np.save(root / "depth" / sub / f"s{i:03d}.npy", rng.normal(size=4).astype(np.float32) + label)
    if with_csv:
        (root / "labels.csv").write_text("stem,label\n" + "".join(f"s{i:03d},{['a', 'b', 'c'][i % 3]}\n" for i in range(60)))
    return root


@pytest.mark.parametrize("with_csv", [False, True])
def test_paired_folder_pairs_by_stem_with_labels_from_folders_or_csv(tmp_path, with_csv):
    from fuselab.data.paired import paired_folder

    root = _paired(tmp_path, with_csv)
    b = paired_folder(root=str(root), seed=0)
    assert b.forms == {"depth": "vector", "rgb": "map"} and b.dims == {"depth": 4, "rgb": 3}
    assert b.num_classes == 3 and len(b.train) + len(b.val) + len(b.test) == 60
    assert b.class_names == (["a", "b", "c"] if with_csv else ["class0", "class1", "class2"])
    # pairing keeps labels consistent: the image brightness encodes the label
    brightness = torch.cat([b.train.x["rgb"], b.test.x["rgb"]]).mean((1, 2, 3))
    labels = torch.cat([b.train.y, b.test.y])
    for k in range(3):
        assert (brightness[labels == k] > (k * 80) / 255).all() and (brightness[labels == k] < (k * 80 + 60) / 255).all()


def test_paired_folder_unpaired_file_is_one_clear_error(tmp_path):
    from fuselab.data.paired import paired_folder

    root = _paired(tmp_path, True)
    np.save(root / "depth" / "extra.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="'depth/extra' has no partner"):
        paired_folder(root=str(root))
