"""``fuselab predict`` and the georeferencing helpers: per-sample probabilities as CSV, a scene's change map as
PNG and GeoTIFF on the input's grid, GeoTIFF inputs, and one line with exit 2 when rasterio is missing."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fuselab.data.core import IGNORE_INDEX
from fuselab.data.envi import EnviError, read_envi
from fuselab.data.geo import map_info_text, parse_map_info, read_georef, same_transform, write_geotiff
from fuselab.data.landsat import landsat_cd
from fuselab.experiments.predict import predict_run
from fuselab.models.cva import cva
from fuselab.train.config import make_config
from fuselab.train.run import execute
from fuselab.train.session import load_run

rasterio = pytest.importorskip("rasterio")  # the geo extra; part of dev, so CI runs these

TAIZHOU_MAP_INFO = "{UTM, 1.000, 1.000, 203325.000, 3604935.000, 3.0000000000e+001, 3.0000000000e+001, 51, North, WGS-84, units=Meters}"


@pytest.fixture(scope="module")
def cva_run(tmp_path_factory, data_root):
    folder = tmp_path_factory.mktemp("predict") / "cva"
    execute(make_config({"data": {"name": "landsat-cd", "data_root": str(data_root)}, "model": {"name": "cva"},
                         "loss": {"terms": [{"name": "dense-ce"}]}, "train": {"epochs": 1, "threads": 1}}), folder)
    return folder


# ---- georeferencing ---------------------------------------------------------------------------------------


def test_map_info_gives_the_transform_gdal_reads(data_root):
    scene = data_root / "landsat-cd" / "taizhou"
    ours = read_georef(scene / "2000TM")
    assert ours.transform == (30.0, 0.0, 203325.0, 0.0, -30.0, 3604935.0) and ours.crs == "EPSG:32651"
    with rasterio.open(scene / "2000TM") as src:  # GDAL's ENVI driver reads the same header
        assert same_transform(ours, src.transform) and src.crs.to_epsg() == 32651


def test_reference_pixel_other_than_the_corner_and_crops():
    georef = parse_map_info("{UTM, 11.5, 21.0, 1000.0, 5000.0, 30.0, 20.0, 33, South, WGS-84, units=Meters}")
    # pixel position (11.5, 21) (1-based) lies at (1000, 5000): the corner is 10.5 pixels left, 20 up
    assert georef.transform == (30.0, 0.0, 1000.0 - 10.5 * 30.0, 0.0, -20.0, 5000.0 + 20 * 20.0)
    assert georef.crs == "EPSG:32733"
    crop = georef.crop(200, 7)
    assert crop.transform[2] == georef.transform[2] + 7 * 30.0 and crop.transform[5] == georef.transform[5] - 200 * 20.0
    again = parse_map_info(map_info_text(crop, TAIZHOU_MAP_INFO))  # written as a header line and read back
    assert same_transform(again, crop) and again.crs == "EPSG:32651"  # the template's projection fields stay


def test_rotated_map_info_is_one_line():
    with pytest.raises(EnviError) as exc:
        parse_map_info("{UTM, 1, 1, 0, 0, 30, 30, 51, North, WGS-84, rotation=15.0}")
    assert "rotated" in str(exc.value) and "\n" not in str(exc.value)


def test_geotiff_images_read_as_the_envi_originals(tmp_path, data_root):
    scene = data_root / "landsat-cd" / "taizhou"
    georef = read_georef(scene / "2000TM")
    for name in ("2000TM", "2003TM"):
        write_geotiff(tmp_path / f"{name}.tif", read_envi(scene / name), georef)
    assert same_transform(read_georef(tmp_path / "2000TM.tif"), georef)
    masks = {"change_mask": str(scene / "change.bmp"), "unchanged_mask": str(scene / "unchanged.bmp")}
    from_tif = landsat_cd(images=[str(tmp_path / "2000TM.tif"), str(tmp_path / "2003TM.tif")], fold=0, **masks)
    from_envi = landsat_cd(data_root=str(data_root), fold=0)
    for m in ("t1", "t2"):
        assert torch.equal(from_tif.test.x[m], from_envi.test.x[m])
    assert torch.equal(from_tif.test.y, from_envi.test.y)


# ---- vectors: CSV -----------------------------------------------------------------------------------------


def test_csv_holds_each_test_sample_probabilities_and_the_stored_predictions(mfeat_run, tmp_path):
    folder, result = mfeat_run
    written = predict_run(folder, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    run = load_run(folder)
    assert written.count == len(rows) == len(run.data.test) == 400
    proba = np.array([[float(r[f"p_{c}"]) for c in range(10)] for r in rows])
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-4)
    predicted = np.array([int(r["predicted"]) for r in rows])
    assert np.array_equal(predicted, proba.argmax(1))
    assert np.array_equal(predicted, np.load(folder / "predictions.npz")["y_pred"])  # the scored model
    np.testing.assert_allclose(proba, run.predict_proba(run.data.test.x).numpy(), atol=1e-5)
    labels = np.array([int(r["label"]) for r in rows])
    assert (labels == predicted).mean() == pytest.approx(result.metrics["test_accuracy"], abs=1e-6)


def test_csv_of_another_split(mfeat_run, tmp_path):
    folder, _ = mfeat_run
    written = predict_run(folder, tmp_path / "out", split="val")
    assert written.count == len(load_run(folder).data.val)


# ---- scenes: PNG and GeoTIFF ------------------------------------------------------------------------------


def test_scene_change_map_png_and_geotiff_are_the_models_prediction_on_the_input_grid(cva_run, data_root, tmp_path):
    written = predict_run(cva_run, tmp_path / "out")
    assert written.georeferenced and written.count == 400 * 400
    part = landsat_cd(data_root=str(data_root), fold=0)
    expected = cva(dims=part.dims, num_classes=2)(part.test.x).logits.argmax(1)[0].numpy()
    png = np.asarray(Image.open(tmp_path / "out" / "change_map.png"))
    assert png.shape == (400, 400) and set(np.unique(png)) <= {0, 255}
    assert np.array_equal(png > 0, expected.astype(bool))
    with rasterio.open(tmp_path / "out" / "change_map.tif") as tif:
        assert np.array_equal(tif.read(1), expected.astype(np.uint8))
        assert same_transform(read_georef(data_root / "landsat-cd" / "taizhou" / "2000TM"), tif.transform)
        assert tif.crs.to_epsg() == 32651
    with rasterio.open(tmp_path / "out" / "change_probability.tif") as tif:
        p = tif.read(1)
    assert p.dtype == np.float32 and np.array_equal(p > 0.5, expected.astype(bool))
    labels = torch.stack([f.test.y[0] for f in landsat_cd(data_root=str(data_root)).folds]).amax(0).numpy()
    keep = labels != IGNORE_INDEX
    assert ((png > 0)[keep] == (labels[keep] == 1)).mean() > 0.95  # CVA's overall accuracy on Taizhou is about 0.97


def test_scene_without_map_info_gets_a_png_only(cva_run, data_root, tmp_path):
    scene = data_root / "landsat-cd" / "taizhou"
    for name in ("2000TM", "2003TM"):  # the images, headers without map info, and no masks at all
        (tmp_path / name).write_bytes((scene / name).read_bytes())
        header = [ln for ln in (scene / f"{name}.HDR").read_text().splitlines() if not ln.startswith(("map info", "coordinate"))]
        (tmp_path / f"{name}.hdr").write_text("\n".join(header) + "\n")
    written = predict_run(cva_run, tmp_path / "out", [f"data.images=[{tmp_path / '2000TM'},{tmp_path / '2003TM'}]"])
    assert not written.georeferenced and set(written.files) == {"png", "npy"}
    assert not (tmp_path / "out" / "change_map.tif").exists()


def test_missing_rasterio_is_one_line_naming_the_extra(cva_run, tmp_path, capsys, monkeypatch):
    from fuselab.cli import main

    monkeypatch.setitem(sys.modules, "rasterio", None)  # import rasterio now raises ImportError
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(cva_run), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fuselab[geo]" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_predict_cli_bad_fold_and_bad_split_are_one_line(mfeat_run, tmp_path, capsys):
    from fuselab.cli import main

    folder, _ = mfeat_run
    for args, words in ((["--fold", "3"], "has 1 fold model"), (["--split", "holdout"], "--split must be one of")):
        with pytest.raises(SystemExit) as exc:
            main(["predict", str(folder), "--out", str(tmp_path / "out"), *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err



def test_geotiff_input_gives_a_geotiff_on_its_grid(cva_run, data_root, tmp_path):
    scene = data_root / "landsat-cd" / "taizhou"
    georef = read_georef(scene / "2000TM").crop(100, 50)  # a window elsewhere: the output must follow the input
    for name in ("2000TM", "2003TM"):
        write_geotiff(tmp_path / f"{name}.tif", read_envi(scene / name)[:, 100:300, 50:350], georef)
    written = predict_run(cva_run, tmp_path / "out", [f"data.images=[{tmp_path / '2000TM.tif'},{tmp_path / '2003TM.tif'}]"])
    assert written.georeferenced and written.count == 200 * 300
    with rasterio.open(tmp_path / "out" / "change_map.tif") as tif:
        assert tif.shape == (200, 300) and same_transform(georef, tif.transform) and tif.crs.to_epsg() == 32651
        assert tif.transform.c == 203325.0 + 50 * 30.0 and tif.transform.f == 3604935.0 - 100 * 30.0
