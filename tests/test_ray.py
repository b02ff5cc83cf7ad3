"""The Ray backend on a local Ray instance: same runs, same store, same table as local processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from fuselab.experiments.store import Store

if os.environ.get("CI") != "true":  # under CI a missing Ray fails the test instead
    pytest.importorskip("ray")

SPEC = {
    "name": "on-ray",
    "base": {
        "data": {"name": "mfeat", "views": ["fou", "kar"]},
        "model": {"name": "mlp-streams", "hidden": 32},
        "train": {"epochs": 3, "batch_size": 64, "lr": 5.0e-3},
    },
    "grid": {"fusion.name": ["concat", "sum"]},
    "seeds": [0],
}


def test_compare_on_a_local_ray_instance_matches_local_processes(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    base = [sys.executable, "-m", "fuselab.cli", "compare", str(spec), "--jobs", "2"]
    on_ray = subprocess.run([*base, "--store", str(tmp_path / "ray"), "--backend", "ray"],
                            capture_output=True, text=True, timeout=900)
    assert on_ray.returncode == 0, on_ray.stderr[-2000:]
    assert "2 trained" in on_ray.stdout and "on Ray" in on_ray.stdout
    store = Store(tmp_path / "ray")
    runs = store.experiment_runs("on-ray")
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in runs)
    for r in runs:  # the run folders came back from the workers whole
        folder = store.run_dir(r["run_id"])
        assert (folder / "metrics.json").is_file() and (folder / "predictions.npz").is_file()
    local = subprocess.run([*base, "--store", str(tmp_path / "local")], capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, local.stderr[-2000:]
    table = lambda out: out[out.index("on-ray: test accuracy"):out.index("tables:")]  # noqa: E731
    assert table(on_ray.stdout) == table(local.stdout)  # same seeds and threads: identical results
    again = subprocess.run([*base, "--store", str(tmp_path / "ray"), "--backend", "ray"],
                           capture_output=True, text=True, timeout=900)
    assert "0 trained, 2 already in the store" in again.stdout
