"""A real (small) training run on mfeat: it learns, it is deterministic, it writes its run folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from fuselab.train.config import make_config
from fuselab.train.loop import NonFiniteLossError, warmup_cosine
from fuselab.train.run import execute

SMALL = ["data.views=[fou,kar,zer]", "model.hidden=32", "train.epochs=6", "train.threads=1", "train.batch_size=128"]


def test_small_real_run_learns_and_writes_its_folder(tmp_path):
    cfg = make_config(None, [*SMALL, "fusion.name=concat"])
    result = execute(cfg, tmp_path / "run")
    assert result.metrics["test_accuracy"] > 0.85  # chance is 0.10
    assert 0 <= result.metrics["best_epoch"] < 6 and len(result.history) == 6
    folder = tmp_path / "run"
    assert json.loads((folder / "metrics.json").read_text())["test_accuracy"] == result.metrics["test_accuracy"]
    history = pd.read_csv(folder / "history.csv")
    assert list(history["epoch"]) == list(range(6)) and "train_ce" in history and "val_accuracy" in history
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    env = json.loads((folder / "environment.json").read_text())
    assert env["torch_threads"] == 1 and env["versions"]["torch"]
    state = torch.load(folder / "checkpoint.pt")
    assert any(k.startswith("encoders.kar") for k in state) and "head.1.weight" in state
    pred = __import__("numpy").load(folder / "predictions.npz")
    assert pred["y_pred"].shape == (400,) and (pred["y_pred"] == pred["y_true"]).mean() == pytest.approx(result.metrics["test_accuracy"])
    assert (folder / "logs" / "metrics.csv").is_file()


def test_same_seed_same_threads_identical_metrics():
    cfg = make_config(None, [*SMALL, "fusion.name=gated", "train.epochs=3", "seed=5"])
    a, b = execute(cfg), execute(cfg)
    assert a.history == b.history and a.metrics["test_accuracy"] == b.metrics["test_accuracy"]
    c = execute(make_config(None, [*SMALL, "fusion.name=gated", "train.epochs=3", "seed=6"]))
    assert c.history != a.history


def test_loss_terms_are_logged_per_epoch():
    cfg = make_config(None, [*SMALL, "train.epochs=2", "fusion.name=sum",
                             "loss.terms=[{name: ce, weight: 1.0}, {name: aux-unimodal, weight: 0.3}]"])
    result = execute(cfg)
    row = result.history[-1]
    assert row["train_loss"] == pytest.approx(row["train_ce"] + 0.3 * row["train_aux-unimodal"], rel=1e-5)


def test_non_finite_loss_stops_with_a_clear_error():
    cfg = make_config(None, [*SMALL, "train.epochs=2", "train.lr=1e30", "train.grad_clip=0", "train.warmup=0"])
    with pytest.raises(NonFiniteLossError, match="non-finite at epoch"):
        execute(cfg)


def test_warmup_then_cosine():
    f = warmup_cosine(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path):
    cfg = make_config(None, [*SMALL, "fusion.name=gated", "train.epochs=5", "train.checkpoint_every=0"])
    uninterrupted = execute(cfg)

    class Killed(Exception):
        pass

    def kill_at_epoch_3(epoch, row):
        if epoch == 3:
            raise Killed

    with pytest.raises(Killed):
        execute(cfg, tmp_path, on_epoch=kill_at_epoch_3, resumable=True)
    assert (tmp_path / "resume.pt").is_file()
    epochs_seen = []
    resumed = execute(cfg, tmp_path, on_epoch=lambda e, r: epochs_seen.append(e), resumable=True)
    assert epochs_seen == [3, 4]  # epochs 0-2 came from the saved state
    assert resumed.history == uninterrupted.history
    assert resumed.metrics["test_accuracy"] == uninterrupted.metrics["test_accuracy"]
    assert not (tmp_path / "resume.pt").exists()
