"""A store that loses nothing: kill -9 in the middle of a sweep, and two sweeps on one store at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml

from fuselab.experiments.store import Store
from fuselab.train.config import make_config
from fuselab.train.run import execute

EPOCHS = 60  # long enough (about 1 s of training per run) that a saved state can be seen before the run ends

SPEC = {
    "name": "reliable",
    "base": {
        "data": {"name": "mfeat", "views": ["fou", "kar"]},
        "model": {"name": "mlp-streams", "hidden": 32},
        "train": {"epochs": EPOCHS, "batch_size": 64, "lr": 5.0e-3, "checkpoint_every": 0.0},
    },
    "grid": {"fusion.name": ["concat", "sum"]},
    "seeds": [0, 1],
}


def _compare(tmp_path, spec=SPEC, jobs=1, **kw):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "fuselab.cli", "compare", str(path), "--store", str(tmp_path / "store"), "--jobs", str(jobs)]
    return cmd


def _runs(store: Store):
    return {r["run_id"]: r for r in store.experiment_runs("reliable")}


def _saved_state(store: Store, run_id: str):
    """The partial folder of ``run_id`` that holds a saved training state, or None."""
    for folder in store.partial_dirs(run_id):
        if (folder / "resume.pt").is_file():
            return folder
    return None


def _killable(store: Store):
    """The run to kill: one that is running and has saved a state while another is done; or None."""
    if not store.exists():
        return None
    try:
        runs = _runs(store)
    except Exception:  # noqa: BLE001 - the schema may still be being created
        return None
    running = [r for r in runs.values() if r["status"] == "running"]
    done = [r for r in runs.values() if r["status"] == "done"]
    if done and running and _saved_state(store, running[0]["run_id"]) is not None:
        return running[0]["run_id"]
    return None


def test_kill_9_then_rerun_finishes_every_run_exactly_once_and_resumes(tmp_path):
    cmd = _compare(tmp_path)
    store = Store(tmp_path / "store")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    victim = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # wait until one run is done and the next has saved a state
            time.sleep(0.05)
            candidate = _killable(store)
            if candidate is None:
                continue
            # freeze the sweep, then check again: the run may have finished between the look and the stop
            os.killpg(proc.pid, signal.SIGSTOP)
            if _killable(store) == candidate:
                victim = candidate
                break
            os.killpg(proc.pid, signal.SIGCONT)
        assert victim is not None, f"the sweep never reached a killable point (exit code {proc.poll()})"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert _runs(store)[victim]["status"] == "running"  # as the kill left it
    # the state the killed process left: training resumes after its epoch
    saved = torch.load(_saved_state(store, victim) / "resume.pt", map_location="cpu", weights_only=True)
    resume_at = saved["epoch"] + 1
    assert 1 <= resume_at < EPOCHS
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    runs = _runs(store)
    assert all(r["status"] == "done" for r in runs.values())
    assert {rid: r["attempts"] for rid, r in runs.items()} == {rid: (2 if rid == victim else 1) for rid in runs}
    assert sorted(p.name for p in (store.root / "runs").iterdir()) == sorted(runs)  # no partial folders left
    folder = store.run_dir(victim)
    # the saved state was used: the second attempt trained only the epochs after it
    attempts = json.loads((folder / "attempts.json").read_text())
    assert [(a["first_epoch"], a["epochs_trained"]) for a in attempts] == [(resume_at, EPOCHS - resume_at)]
    # and the logs kept the epochs trained before the kill
    logged = pd.read_csv(folder / "logs" / "metrics.csv")
    assert sorted(logged["step"].astype(int)) == list(range(EPOCHS))
    # the killed run ended exactly as an uninterrupted run would
    threads = json.loads((folder / "environment.json").read_text())["torch_threads"]
    config = runs[victim]["config"]
    fresh = execute(make_config(config, [f"train.threads={threads}"]))
    stored = pd.read_csv(folder / "history.csv")
    assert list(stored["epoch"]) == list(range(EPOCHS))
    assert stored["val_accuracy"].tolist() == pytest.approx([r["val_accuracy"] for r in fresh.history], abs=0)
    assert logged.sort_values("step")["val_accuracy"].tolist() == pytest.approx(stored["val_accuracy"].tolist(), abs=1e-12)
    assert json.loads((folder / "metrics.json").read_text())["test_accuracy"] == fresh.metrics["test_accuracy"]


def test_two_sweeps_on_one_store_train_each_run_once(tmp_path):
    cmd = _compare(tmp_path)
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out1, err1 = first.communicate(timeout=600)
    out2, err2 = second.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    runs = _runs(Store(tmp_path / "store"))
    assert len(runs) == 4 and all(r["status"] == "done" and r["attempts"] == 1 for r in runs.values())
    trained = [int(re.search(r"^(\d+) trained, \d+ already in the store", out, re.M).group(1)) for out in (out1, out2)]
    assert sum(trained) == 4  # between them, every run trained once
    table = lambda out: out[out.index("reliable: test accuracy"):out.index("tables:")]  # noqa: E731
    assert table(out1) == table(out2)
