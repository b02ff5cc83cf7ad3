"""``fuselab evaluate``: a run or an experiment's runs scored on another data configuration, recorded beside each
run; the fold ensemble and each fold against a hand computation; Kappa, OA and F1 / IoU of the change class
for change detection (also printed by ``fuselab run``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import SMALL_RUN

from fuselab.data.core import IGNORE_INDEX
from fuselab.experiments.evaluate import evaluate_target, read_evaluations, score_run
from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import load_spec
from fuselab.experiments.store import Store
from fuselab.train.config import make_config
from fuselab.train.run import execute
from fuselab.train.session import load_run



def kappa_oa_f1_iou(pred: np.ndarray, true: np.ndarray) -> tuple[float, float, float, float]:
    """Cohen's Kappa, overall accuracy, F1 and IoU of class 1 from a 2 x 2 confusion matrix, by hand."""
    keep = true != IGNORE_INDEX
    p, t = pred[keep].astype(int), true[keep].astype(int)
    cm = np.zeros((2, 2))
    np.add.at(cm, (t, p), 1)
    n = cm.sum()
    oa = np.trace(cm) / n
    pe = (cm.sum(0) * cm.sum(1)).sum() / n**2
    tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
    return (oa - pe) / (1 - pe), oa, 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


@pytest.fixture(scope="module")
def cd_run(tmp_path_factory, data_root):
    """A tiny five-fold change-detection run on Taizhou (one model per fold)."""
    folder = tmp_path_factory.mktemp("evaluate") / "cd"
    cfg = {"data": {"name": "landsat-cd", "data_root": str(data_root)},
           "model": {"name": "conv-streams", "widths": [4, 8], "shared_weights": True, "fuse_at": "all", "neck": "fpn"},
           "fusion": {"name": "abs-diff"}, "loss": {"terms": [{"name": "dense-ce"}]},
           "train": {"epochs": 1, "batch_size": 32, "lr": 3.0e-3, "threads": 1}}
    result = execute(make_config(cfg), folder)
    return folder, result


def test_evaluating_a_run_on_its_own_data_reproduces_its_test_metrics(mfeat_run):
    folder, result = mfeat_run
    out = evaluate_target(str(folder))
    record = json.loads((folder / "evaluations" / "default.json").read_text())
    assert record["metrics"]["accuracy"] == pytest.approx(result.metrics["test_accuracy"], abs=1e-6)
    assert record["metrics"]["macro_f1"] == pytest.approx(result.metrics["test_macro_f1"], abs=1e-6)
    assert record["n"] == 400 and record["run_id"] == "run" and out.rows[0]["record"] == record
    assert "| concat | one model | 1 | 400 |" in out.markdown


def test_another_split_is_scored_by_hand_and_recorded_under_its_own_name(mfeat_run):
    folder, _ = mfeat_run
    evaluate_target(str(folder), ["seed=3"])
    run = load_run(folder, ["seed=3"])  # the split of seed 3
    expected = (run.predict(run.data.test.x) == run.data.test.y).float().mean().item()
    records = read_evaluations(folder)
    assert {"default", "seed=3"} <= set(records)
    assert records["seed=3"]["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-6)
    assert records["seed=3"]["overrides"] == ["seed=3"]
    assert records["default"]["metrics"] != records["seed=3"]["metrics"]  # the earlier evaluation is kept


def test_cross_validated_run_pooled_reproduces_and_fold_ensemble_by_hand(cd_run, data_root):
    folder, result = cd_run
    pooled = score_run(folder)
    assert pooled["mode"] == "pooled" and pooled["n"] == 4227 + 17163
    for key in ("accuracy", "kappa", "f1_change", "iou_change"):
        assert pooled["metrics"][key] == pytest.approx(result.metrics[f"test_{key}"], abs=1e-6), key
    scored = score_run(folder, ["data.fold=all"])  # every labelled pixel, every fold model and their mean
    assert scored["mode"] == "ensemble" and scored["models"] == 5 and scored["n"] == 4227 + 17163
    run = load_run(folder, ["data.fold=all"])
    x, y = run.data.test.x, run.data.test.y.numpy()
    probs = [torch.softmax(m(x).logits, 1) for m in run.models]
    ensemble = torch.stack(probs).mean(0).argmax(1).numpy()
    kappa, oa, f1, iou = kappa_oa_f1_iou(ensemble, y)
    got = scored["metrics"]
    assert (got["kappa"], got["accuracy"], got["f1_change"], got["iou_change"]) == pytest.approx((kappa, oa, f1, iou), abs=1e-5)
    singles = [kappa_oa_f1_iou(p.argmax(1).numpy(), y)[0] for p in probs]
    assert [f["kappa"] for f in scored["folds"]] == pytest.approx(singles, abs=1e-5)
    assert scored["single"]["kappa"]["mean"] == pytest.approx(np.mean(singles), abs=1e-5)
    assert scored["single"]["kappa"]["std"] == pytest.approx(np.std(singles, ddof=1), abs=1e-5)


def test_experiment_table_is_mean_and_std_over_seeds_per_method(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "tiny-eval", "base": SMALL_RUN, "grid": {"fusion.name": ["concat", "sum"]},
                                         "seeds": [0, 1], "baseline": "concat"}))
    store = Store(tmp_path / "store")
    execute_plan(prepare(load_spec(spec_file), store), store, jobs=1)
    out = evaluate_target("tiny-eval", ["seed=5"], store=tmp_path / "store", name="seed5")
    assert len(out.rows) == 4 and out.files["markdown"].is_file()
    for method in ("concat", "sum"):
        values = []
        for row in (r for r in out.rows if r["method"] == method):
            run_dir = store.run_dir(row["run_id"])
            record = read_evaluations(run_dir)["seed5"]
            run = load_run(run_dir, ["seed=5"])
            assert record["metrics"]["accuracy"] == pytest.approx(
                (run.predict(run.data.test.x) == run.data.test.y).float().mean().item(), abs=1e-6)
            values.append(record["metrics"]["accuracy"] * 100)
        cell = f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
        assert f"| {method} | one model | 2 | 400 | {cell} |" in out.markdown


def test_cli_errors_are_one_line(mfeat_run, tmp_path, capsys):
    from fuselab.cli import main

    folder, _ = mfeat_run
    cases = (
        (["evaluate", "nothing-here", "--store", str(tmp_path / "none")], "no store at"),
        (["evaluate", str(folder), "--name", "../escape"], "--name '../escape'"),
        (["evaluate", str(folder), "data.views=[fou]"], "does not fit this data"),
    )
    for args, words in cases:
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "escape.json").exists()


def test_run_prints_kappa_oa_f1_and_iou_for_change_detection(data_root, tmp_path, capsys):
    from fuselab.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "data.name=landsat-cd", f"data.data_root={data_root}", "model.name=cva", "train.epochs=1",
              "train.threads=1", "--out", str(tmp_path / "runs")])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    metrics = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())
    assert f"test Kappa {metrics['test_kappa'] * 100:.2f}" in out
    assert f"OA {metrics['test_accuracy'] * 100:.2f} %" in out
    assert f"F1 change {metrics['test_f1_change'] * 100:.2f} %" in out and f"IoU change {metrics['test_iou_change'] * 100:.2f} %" in out


def test_one_model_run_on_cross_validated_data_is_pooled_over_every_labelled_pixel(data_root, tmp_path):
    folder = tmp_path / "cva"
    result = execute(make_config({"data": {"name": "landsat-cd", "data_root": str(data_root)}, "model": {"name": "cva"},
                                  "train": {"epochs": 1, "threads": 1}}), folder)
    scored = score_run(folder)
    assert scored["mode"] == "pooled" and scored["models"] == 1 and scored["n"] == 4227 + 17163
    assert scored["metrics"]["kappa"] == pytest.approx(result.metrics["test_kappa"], abs=1e-6)
    assert len(scored["folds"]) == 5
