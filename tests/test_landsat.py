"""landsat-cd on the real Taizhou scene: ENVI reading, fixed spatial folds, the dense loss, cva, a real run,
and one clear line for each kind of bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fuselab.data.core import IGNORE_INDEX
from fuselab.data.envi import EnviError, read_envi, write_envi
from fuselab.data.landsat import block_folds, landsat_cd
from fuselab.losses import WeightedLoss
from fuselab.metrics import prediction_metrics
from fuselab.models.cva import cva
from fuselab.models.output import ModelOutput
from fuselab.train.config import make_config
from fuselab.train.run import execute


@pytest.fixture(scope="module")
def scene(data_root):
    return data_root / "landsat-cd" / "taizhou"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


# ---- ENVI -------------------------------------------------------------------------------------------------


def test_taizhou_reads_as_its_header_says(scene):
    cube = read_envi(scene / "2000TM")  # the header is 2000TM.HDR (upper case)
    assert cube.shape == (6, 400, 400) and cube.dtype == np.uint8
    raw = np.fromfile(scene / "2000TM", dtype=np.uint8).reshape(6, 400, 400)
    assert np.array_equal(cube, raw)


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
@pytest.mark.parametrize("byte_order", [0, 1])
def test_envi_interleave_byte_order_and_offset(tmp_path, interleave, byte_order):
    cube = np.arange(3 * 5 * 7, dtype=np.int16).reshape(3, 5, 7) * 97 - 1000
    write_envi(tmp_path / "img", cube, interleave=interleave, byte_order=byte_order, header_offset=16,
               header_suffix=".HDR")
    assert np.array_equal(read_envi(tmp_path / "img"), cube)


def test_header_that_does_not_match_the_file_is_one_line(tmp_path, scene):
    shutil.copy(scene / "2000TM.HDR", tmp_path / "short.HDR")
    (tmp_path / "short").write_bytes((scene / "2000TM").read_bytes()[:500_000])
    with pytest.raises(EnviError) as exc:
        read_envi(tmp_path / "short")
    assert "960000 bytes, but the file has 500000" in _one_line(exc)


def test_missing_header_is_one_line(tmp_path):
    (tmp_path / "img").write_bytes(b"\0" * 10)
    with pytest.raises(EnviError) as exc:
        read_envi(tmp_path / "img")
    assert "has no header" in _one_line(exc)


# ---- folds ------------------------------------------------------------------------------------------------


def test_folds_are_disjoint_and_cover_every_labelled_pixel(scene, data_root):
    bundle = landsat_cd(data_root=str(data_root), folds=5, block=40)
    assert bundle.task == "change-detection" and len(bundle.folds) == 5
    labelled = (np.asarray(Image.open(scene / "change.bmp")) > 0) | (np.asarray(Image.open(scene / "unchanged.bmp")) > 0)
    tested = np.stack([(f.test.y[0] != IGNORE_INDEX).numpy() for f in bundle.folds])
    assert (tested.sum(0) <= 1).all()  # disjoint
    assert np.array_equal(tested.any(0), labelled)  # every labelled pixel tested once
    assert tested.sum() == 4227 + 17163
    fold_map = block_folds((400, 400), 40, 5)
    for f, part in enumerate(bundle.folds):
        val = (part.val.y[0] != IGNORE_INDEX).numpy()
        assert not (val & tested[f]).any() and (fold_map[val] == (f + 1) % 5).all()
        # training labels come only from the other folds' blocks: no tile carries a test or validation label
        assert (part.train.y != IGNORE_INDEX).any()
        assert int((part.train.y == 1).sum()) > 0 and int((part.train.y == 0).sum()) > 0
    # the folds do not depend on the seed
    other = landsat_cd(data_root=str(data_root), folds=5, block=40, seed=7, fold=2)
    assert torch.equal(other.test.y, bundle.folds[2].test.y)


def test_training_windows_hold_no_held_out_label(data_root, scene):
    # windows aligned with the blocks cover the scene once: the training labels are exactly the labelled
    # pixels of the training folds (test fold 1, validation fold 2 held out)
    part = landsat_cd(data_root=str(data_root), folds=5, block=40, fold=1, tile=40, tile_stride=40)
    change = np.asarray(Image.open(scene / "change.bmp")) > 0
    unchanged = np.asarray(Image.open(scene / "unchanged.bmp")) > 0
    training = ~np.isin(block_folds((400, 400), 40, 5), [1, 2])
    assert int((part.train.y == 1).sum()) == int((change & training).sum())
    assert int((part.train.y == 0).sum()) == int((unchanged & training).sum())
    assert (part.train.y != IGNORE_INDEX).flatten(1).any(1).all()  # windows without a training label dropped


# ---- the dense loss ---------------------------------------------------------------------------------------


def test_dense_loss_ignores_unlabelled_pixels():
    torch.manual_seed(0)
    target = torch.randint(0, 2, (2, 9, 9))
    target[:, :4] = IGNORE_INDEX
    logits = torch.randn(2, 2, 9, 9, requires_grad=True)
    loss = WeightedLoss([{"name": "dense-ce"}])
    base, _ = loss(ModelOutput(logits=logits), target)
    changed = logits.detach().clone()
    changed[:, :, :4] = torch.randn(2, 2, 4, 9) * 100  # anything at the unlabelled pixels
    again, _ = loss(ModelOutput(logits=changed), target)
    assert torch.equal(base, again)
    # while a labelled pixel does count, and the value is the mean over labelled pixels only
    moved = logits.detach().clone()
    moved[:, 1, 5] += 3.0
    assert not torch.equal(loss(ModelOutput(logits=moved), target)[0], base)
    keep = target != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits.movedim(1, -1)[keep], target[keep])
    assert base.item() == pytest.approx(manual.item(), rel=1e-6)
    base.backward()
    assert logits.grad[:, :, :4].abs().sum() == 0
    none = torch.full_like(target, IGNORE_INDEX)
    assert loss(ModelOutput(logits=logits), none)[0].item() == 0.0  # no labelled pixel: 0, not NaN


# ---- cva --------------------------------------------------------------------------------------------------


def test_cva_finds_the_changed_square():
    rng = np.random.default_rng(0)
    first = rng.normal(size=(1, 4, 48, 48)).astype(np.float32)
    second = first + rng.normal(scale=0.1, size=first.shape).astype(np.float32)
    second[..., 10:22, 25:37] += 3.0  # the change: a 12 x 12 square in every band
    model = cva(dims={"t1": 4, "t2": 4}, num_classes=2)
    logits = model({"t1": torch.from_numpy(first), "t2": torch.from_numpy(second)}).logits
    pred = logits.argmax(1)[0].numpy()
    truth = np.zeros((48, 48), dtype=bool)
    truth[10:22, 25:37] = True
    assert (pred.astype(bool) == truth).mean() > 0.99 and pred[truth].all()


def test_cva_on_taizhou_matches_the_reference_figure(data_root):
    part = landsat_cd(data_root=str(data_root), fold=0)
    model = cva(dims=part.dims, num_classes=2)
    labels = torch.stack([p.test.y[0] for p in landsat_cd(data_root=str(data_root)).folds]).amax(0)
    pred = model(part.test.x).logits.argmax(1)[0]
    kappa = prediction_metrics("change-detection", pred, labels, 2)["kappa"].item()
    assert 0.88 < kappa < 0.92  # 0.90 measured for CVA + Otsu on per-band standardised images


# ---- a real training run ----------------------------------------------------------------------------------

TINY = {
    "data": {"name": "landsat-cd", "fold": 0},
    "model": {"name": "conv-streams", "widths": [8, 16], "shared_weights": True, "fuse_at": "all", "neck": "fpn"},
    "fusion": {"name": "abs-diff"},
    "loss": {"terms": [{"name": "dense-ce"}]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 3.0e-3, "threads": 1},
}


def test_small_real_training_run_reaches_kappa_well_above_zero(data_root, tmp_path):
    cfg = make_config(TINY, [f"data.data_root={data_root}"])
    result = execute(cfg, tmp_path / "run")
    m = result.metrics
    assert m["test_kappa"] > 0.6, m  # chance is 0
    assert {"test_accuracy", "test_f1_change", "test_iou_change", "val_kappa"} <= set(m)
    pred = np.load(tmp_path / "run" / "predictions.npz")
    n_test = int((landsat_cd(data_root=str(data_root), fold=0).test.y != IGNORE_INDEX).sum())
    assert pred["y_true"].shape == (n_test,)  # flattened over the held-out labelled pixels only
    assert (pred["y_true"] == pred["y_pred"]).mean() == pytest.approx(m["test_accuracy"], abs=1e-6)


def test_cva_flows_through_a_run_over_all_folds(data_root, tmp_path):
    cfg = make_config({**TINY, "data": {"name": "landsat-cd"}, "model": {"name": "cva"}},
                      [f"data.data_root={data_root}"])
    result = execute(cfg, tmp_path / "cva")
    assert result.metrics["folds"] == 5 and result.metrics["params"] == 0
    assert 0.88 < result.metrics["test_kappa"] < 0.92
    pred = np.load(tmp_path / "cva" / "predictions.npz")
    assert pred["y_true"].shape == (4227 + 17163,)  # pooled over the folds: every labelled pixel once


# ---- bad input: one clear line each -----------------------------------------------------------------------


def _scene_copy(tmp_path, scene):
    for name in ("2000TM", "2000TM.HDR", "2003TM", "2003TM.HDR", "change.bmp", "unchanged.bmp"):
        shutil.copy(scene / name, tmp_path / name)
    return {"images": [str(tmp_path / "2000TM"), str(tmp_path / "2003TM")],
            "change_mask": str(tmp_path / "change.bmp"), "unchanged_mask": str(tmp_path / "unchanged.bmp")}


def test_dates_of_different_sizes_are_one_line(tmp_path, scene):
    paths = _scene_copy(tmp_path, scene)
    write_envi(tmp_path / "small", np.zeros((6, 300, 400), dtype=np.uint8))
    with pytest.raises(ValueError) as exc:
        landsat_cd(**{**paths, "images": [paths["images"][0], str(tmp_path / "small")]})
    assert "differ in size" in _one_line(exc)


def test_missing_mask_is_one_line(tmp_path, scene):
    paths = _scene_copy(tmp_path, scene)
    (tmp_path / "change.bmp").unlink()
    with pytest.raises(FileNotFoundError) as exc:
        landsat_cd(**paths)
    assert "change mask" in _one_line(exc) and "does not exist" in str(exc.value)


def test_mask_of_another_size_is_one_line(tmp_path, scene):
    paths = _scene_copy(tmp_path, scene)
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "unchanged.bmp")
    with pytest.raises(ValueError) as exc:
        landsat_cd(**paths)
    assert "unchanged mask" in _one_line(exc)


def test_bad_header_through_the_cli_is_exit_2_one_line(tmp_path, scene, capsys):
    from fuselab.cli import main

    paths = _scene_copy(tmp_path, scene)
    (tmp_path / "2003TM").write_bytes((scene / "2003TM").read_bytes()[:-1])
    with pytest.raises(SystemExit) as exc:
        main(["run", "data.name=landsat-cd", f"data.images=[{paths['images'][0]},{paths['images'][1]}]",
              f"data.change_mask={paths['change_mask']}", f"data.unchanged_mask={paths['unchanged_mask']}",
              "model.name=cva", "train.epochs=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match '2003TM'" in err
