"""Data-parallel training: 2 processes on CPU (gloo) give the single-process result within tolerance."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

COMMON = ["data.views=[fou,kar]", "model.hidden=32", "model.dropout=0.0", "train.epochs=3", "train.batch_size=64",
          "train.accelerator=cpu", "train.threads=1", "fusion.name=sum"]


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "fuselab.cli", "run", *COMMON, *extra, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return json.loads((folder / "metrics.json").read_text()), pd.read_csv(folder / "history.csv")


def test_two_process_ddp_matches_one_process(tmp_path):
    single, single_history = _run(tmp_path, "single")
    ddp, ddp_history = _run(tmp_path, "ddp", "train.devices=2", "train.strategy=ddp")
    # each process takes half of every global batch and gradients are averaged: the same optimisation
    assert ddp_history["train_loss"].tolist() == pytest.approx(single_history["train_loss"].tolist(), rel=2e-3)
    assert ddp["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=0.0051)  # at most 2 of 400 digits


def test_compare_refuses_multi_device_runs(tmp_path):
    from fuselab.experiments.spec import parse_spec
    from fuselab.train.config import ConfigError

    spec = parse_spec({"name": "x", "base": {"train": {"devices": 2}}, "grid": {"fusion.name": ["concat"]}})
    with pytest.raises(ConfigError, match="launch it with `fuselab run`"):
        spec.plan()
