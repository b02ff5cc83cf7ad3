"""Transfer between scenes: the Taizhou scene cut into two halves saved as two scenes (ENVI images with map info,
masks); ``fuselab compare`` trains on the top half (``data.fold=all``), ``fuselab evaluate`` scores the bottom
half, ``fuselab predict`` writes its change map as PNG and GeoTIFF on the bottom half's grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fuselab.data.core import IGNORE_INDEX
from fuselab.data.envi import read_envi, write_envi
from fuselab.data.geo import copy_georeference, read_georef, same_transform
from fuselab.data.landsat import block_folds, landsat_cd, scene_tiles
from fuselab.experiments.store import Store
from fuselab.metrics import prediction_metrics
from fuselab.models.cva import cva

rasterio = pytest.importorskip("rasterio")  # the geo extra; part of dev, so CI runs this

HALF = 200  # lines of each half


def cut_scene(source: Path, out: Path) -> dict[str, Path]:
    """The top and bottom halves of the scene in ``source`` as two scene folders (ENVI + map info + PNG masks)."""
    folders = {}
    for name, start in (("top", 0), ("bottom", HALF)):
        folder = out / name
        folder.mkdir(parents=True)
        for image in ("2000TM", "2003TM"):
            write_envi(folder / image, read_envi(source / image)[:, start : start + HALF])
            copy_georeference(source / f"{image}.HDR", folder / image, row=start)
        for mask in ("change", "unchanged"):
            Image.fromarray(np.asarray(Image.open(source / f"{mask}.bmp"))[start : start + HALF]).save(folder / f"{mask}.png")
        folders[name] = folder
    return folders


def scene_overrides(folder: Path) -> list[str]:
    return [f"data.images=[{folder / '2000TM'},{folder / '2003TM'}]", f"data.change_mask={folder / 'change.png'}",
            f"data.unchanged_mask={folder / 'unchanged.png'}"]


def scene_section(folder: Path) -> dict:
    return {"images": [str(folder / "2000TM"), str(folder / "2003TM")], "change_mask": str(folder / "change.png"),
            "unchanged_mask": str(folder / "unchanged.png")}


def test_fold_all_trains_on_every_fold_but_the_validation_slice_and_tests_every_labelled_pixel(data_root):
    bundle = landsat_cd(data_root=str(data_root), fold="all", folds=5, block=40)
    assert bundle.folds is None
    labels = torch.stack([f.test.y[0] for f in landsat_cd(data_root=str(data_root)).folds]).amax(0)
    assert torch.equal(bundle.test.y[0], labels)  # every labelled pixel, change and unchanged
    assert int((bundle.test.y != IGNORE_INDEX).sum()) == 4227 + 17163
    fold_map = torch.from_numpy(block_folds((400, 400), 40, 5))
    val = bundle.val.y[0] != IGNORE_INDEX
    assert val.any() and (fold_map[val] == 4).all()  # the validation slice is fold k - 1
    assert int(val.sum()) == int((labels[fold_map == 4] != IGNORE_INDEX).sum())
    train_map = torch.where(fold_map != 4, labels, torch.full_like(labels, IGNORE_INDEX))
    scene = torch.stack([bundle.test.x["t1"][0], bundle.test.x["t2"][0]])
    _, expected = scene_tiles(scene, train_map, 32, 16)  # the windows of every other fold's labels
    assert torch.equal(bundle.train.y, expected)
    assert int((labels[fold_map != 4] == 1).sum()) > 0.7 * 4227  # most change pixels are trained on
    assert bundle.test_in_sample  # so its test metrics are a fit, and runs and reports say so
    assert not any(f.test_in_sample for f in landsat_cd(data_root=str(data_root)).folds)

def test_fold_all_rejects_other_words(data_root):
    with pytest.raises(ValueError, match="'all'"):
        landsat_cd(data_root=str(data_root), fold="every")


def test_train_on_one_half_evaluate_and_predict_on_the_other(data_root, tmp_path):
    from fuselab.cli import main

    halves = cut_scene(data_root / "landsat-cd" / "taizhou", tmp_path / "scenes")
    spec = {
        "name": "halves",
        "base": {
            "data": {"name": "landsat-cd", **scene_section(halves["top"]), "fold": "all", "block": 40},
            "model": {"name": "conv-streams", "widths": [4, 8], "shared_weights": True, "fuse_at": "all", "neck": "fpn"},
            "fusion": {"name": "concat-diff"},
            "loss": {"terms": [{"name": "dense-ce"}]},
            "train": {"epochs": 1, "batch_size": 32, "lr": 3.0e-3},
        },
        "variants": [{"name": "concat-diff"}, {"name": "cva", "model": {"name": "cva"}}],
        "seeds": [0],
        "baseline": "cva",
    }
    (tmp_path / "halves.yaml").write_text(yaml.safe_dump(spec))
    store = tmp_path / "store"
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(tmp_path / "halves.yaml"), "train.epochs=3", "train.threads=1", "--store", str(store), "--jobs", "1"])
    assert exc.value.code in (0, None)
    for row in Store(store).experiment_runs("halves"):  # the command line's overrides reach every method
        config = yaml.safe_load((Store(store).run_dir(row["run_id"]) / "config.yaml").read_text())
        assert config["train"]["epochs"] == 3 and config["train"]["threads"] == 1, row["method"]
        metrics = json.loads((Store(store).run_dir(row["run_id"]) / "metrics.json").read_text())
        assert metrics["test_in_sample"] is True, row["method"]  # fold=all tests on its own training pixels
    report = (store / "halves" / "report" / "results.md").read_text()
    assert "In-sample test metrics (the test split holds the training samples too" in report
    assert report.split("In-sample test metrics")[1].split(":", 1)[1].split(".")[0].strip() in (
        "concat-diff, cva", "cva, concat-diff")
    assert "In-sample test metrics" in (store / "halves" / "report" / "results.tex").read_text()

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "halves", "--store", str(store), "--name", "bottom", *scene_overrides(halves["bottom"])])
    assert exc.value.code in (0, None)
    runs = {r["method"]: Store(store).run_dir(r["run_id"]) for r in Store(store).experiment_runs("halves")}
    records = {m: json.loads((d / "evaluations" / "bottom.json").read_text()) for m, d in runs.items()}
    bottom = landsat_cd(**scene_section(halves["bottom"]), fold="all")
    labelled = int((bottom.test.y != IGNORE_INDEX).sum())
    assert labelled == sum(int((np.asarray(Image.open(halves["bottom"] / f"{m}.png")) > 0).sum()) for m in ("change", "unchanged"))
    for record in records.values():
        assert record["n"] == labelled and "data.fold=all" in record["overrides"]  # every labelled pixel of the other half
    expected = cva(dims=bottom.dims, num_classes=2)(bottom.test.x).logits.argmax(1)
    assert records["cva"]["metrics"]["kappa"] == pytest.approx(
        prediction_metrics("change-detection", expected, bottom.test.y, 2)["kappa"].item(), abs=1e-6)
    assert records["concat-diff"]["metrics"]["kappa"] > 0.3  # chance is 0; a few epochs on the top half transfer

    out = tmp_path / "predicted"
    with pytest.raises(SystemExit) as exc:  # images only: predicting needs no reference masks
        main(["predict", str(runs["concat-diff"]), "--out", str(out), scene_overrides(halves["bottom"])[0]])
    assert exc.value.code in (0, None)
    change = np.asarray(Image.open(out / "change_map.png")) > 0
    assert change.shape == (HALF, 400)
    kappa = prediction_metrics("change-detection", torch.from_numpy(change.astype(np.int64))[None], bottom.test.y, 2)["kappa"]
    assert kappa.item() == pytest.approx(records["concat-diff"]["metrics"]["kappa"], abs=1e-6)  # predict and evaluate agree
    with rasterio.open(out / "change_map.tif") as tif:
        assert np.array_equal(tif.read(1).astype(bool), change)
        transform, crs = tif.transform, tif.crs
    with rasterio.open(halves["bottom"] / "2000TM") as src:  # the input's map info as GDAL reads it
        assert same_transform(read_georef(halves["bottom"] / "2000TM"), src.transform)
        assert transform == src.transform and crs == src.crs
    whole = read_georef(data_root / "landsat-cd" / "taizhou" / "2000TM")
    assert transform.f == pytest.approx(whole.transform[5] - HALF * 30.0) and transform.c == whole.transform[2]


def test_compare_overrides_apply_to_every_method_and_keep_run_ids_of_execution_keys(tmp_path, capsys):
    from fuselab.cli import main
    from fuselab.experiments.spec import load_spec, run_id

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "over", "base": {"data": {"name": "mfeat", "views": ["fou", "kar"]}, "model": {"name": "mlp-streams", "hidden": 32},
                                 "train": {"epochs": 2}},
        "grid": {"fusion.name": ["concat", "sum"]}, "variants": [{"name": "wide", "model": {"hidden": 64}}],
        "seeds": [0, 1], "baseline": "concat"}))
    plain = load_spec(spec_file)
    over = load_spec(spec_file)
    over.overrides = ["model.hidden=16", "train.epochs=7"]
    for before, after in zip(plain.plan(), over.plan()):
        assert after.config.model.hidden == 16 and after.config.train.epochs == 7  # the command line wins, variants too
        assert after.config.seed == before.config.seed and after.config.fusion.name == before.config.fusion.name
        assert after.run_id != before.run_id
    threads = load_spec(spec_file)
    threads.overrides = ["train.threads=1"]  # an execution detail: the same runs
    assert [r.run_id for r in threads.plan()] == [r.run_id for r in plain.plan()]
    assert all(r.config.train.threads == 1 for r in threads.plan())
    assert run_id(threads.plan()[0].config) == plain.plan()[0].run_id
    with pytest.raises(SystemExit) as exc:  # a bad override: one line, nothing stored
        main(["compare", str(spec_file), "model.depth=3", "--store", str(tmp_path / "store")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.depth" in err
    assert not (tmp_path / "store" / "fuselab.sqlite").exists()


def test_shipped_change_detection_spec_keeps_its_checkpoints():
    from fuselab.experiments.spec import load_spec

    plan = load_spec("landsat-cd-compare").plan()
    assert all(r.config.train.checkpoint for r in plan)  # its runs can be evaluated and predicted with later


def test_fuselab_run_says_when_its_test_metrics_are_in_sample(data_root, tmp_path, capsys):
    from conftest import run_cli

    from fuselab.cli import IN_SAMPLE_LINE

    code, out, _ = run_cli(capsys, "run", "data.name=landsat-cd", f"data.data_root={data_root}", "data.fold=all",
                           "model.name=cva", "--out", str(tmp_path / "all"))
    assert code == 0 and " ".join(IN_SAMPLE_LINE.split()) in " ".join(out.split())
    code, out, _ = run_cli(capsys, "run", "data.name=landsat-cd", f"data.data_root={data_root}", "data.fold=0",
                           "model.name=cva", "--out", str(tmp_path / "one"))
    assert code == 0 and "in-sample" not in out and "test Kappa" in out
