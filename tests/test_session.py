"""The run-session layer: ``prepare_run`` sets a run up once for every command; ``load_run`` gives a
finished run back with every fold's trained weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from conftest import SMALL_RUN

from fuselab.data.landsat import IGNORE_INDEX
from fuselab.errors import ConfigError
from fuselab.train.config import make_config
from fuselab.train.run import execute
from fuselab.train.session import cached_data, clear_data_cache, load_run, prepare_run



def test_load_run_reproduces_the_stored_test_predictions(mfeat_run):
    folder, result = mfeat_run
    run = load_run(folder)
    assert len(run.models) == 1 and not run.model.training
    assert run.metrics["test_accuracy"] == result.metrics["test_accuracy"]
    stored = np.load(folder / "predictions.npz")
    pred = run.predict(run.data.test.x)
    assert np.array_equal(pred.numpy(), stored["y_pred"])  # the checkpoint is the model that was scored
    assert (pred.numpy() == run.data.test.y.numpy()).mean() == pytest.approx(result.metrics["test_accuracy"], abs=1e-6)  # metrics are float32
    proba = run.predict_proba(run.data.test.x)
    assert proba.shape == (len(run.data.test), 10)
    assert torch.allclose(proba.sum(1), torch.ones(len(proba)), atol=1e-6)


def test_load_run_refuses_what_it_cannot_or_must_not_rebuild(mfeat_run, tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        load_run(tmp_path)
    folder, _ = mfeat_run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.yaml").write_text((folder / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="no checkpoint.pt"):
        load_run(copy)
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["model"] = {"name": "custom-streams", "encoders": {m: {"target": "os.system"} for m in ("fou", "kar")}}
    (tampered / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="trust=True"):
        load_run(tampered)


def test_prepare_run_seeds_and_shares_one_dataset_cache():
    clear_data_cache()
    cfg = make_config(SMALL_RUN)
    first = prepare_run(cfg, cache=True)
    w1 = [p.detach().clone() for p in first.model().parameters()]
    second = prepare_run(cfg, cache=True)
    w2 = list(second.model().parameters())
    assert second.data is first.data  # one build per data section and seed
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))  # seeded: the same initialisation
    other = cached_data(make_config(SMALL_RUN, ["seed=1"]))
    assert other is not first.data and not torch.equal(other.test.x["fou"], first.data.test.x["fou"])  # the seed fixes the split
    assert torch.get_num_threads() == 1


def test_load_run_keeps_every_fold_of_a_cross_validated_scene(data_root, tmp_path):
    base = {
        "data": {"name": "landsat-cd", "data_root": str(data_root)},
        "model": {"name": "conv-streams", "widths": [4, 8], "shared_weights": True, "fuse_at": "all", "neck": "fpn"},
        "fusion": {"name": "abs-diff"},
        "loss": {"terms": [{"name": "dense-ce"}]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 3.0e-3, "threads": 1},
    }
    folder = tmp_path / "cd"
    execute(make_config(base), folder)
    run = load_run(folder)
    assert len(run.models) == 5
    stored = np.load(folder / "predictions.npz")["y_pred"]
    pooled = []
    for i, part in enumerate(run.data.folds):  # fold i's model on fold i's held-out pixels: the pooled predictions
        pred = run.predict(part.test.x, fold=i)
        pooled.append(pred[part.test.y != IGNORE_INDEX].numpy())
    assert np.array_equal(np.concatenate(pooled), stored)
    ensemble = run.predict(run.data.folds[0].test.x)
    assert ensemble.shape == run.data.folds[0].test.y.shape
