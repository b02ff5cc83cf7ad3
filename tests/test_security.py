"""A shared store and a config are data, never code: planted pickles, hostile import paths, tampered stored
configs and path-like names all fail safely (one line, exit 2, or a fresh start) and run nothing."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import parse_spec
from fuselab.experiments.store import Store
from fuselab.models.custom import allow_encoder_factory, build_encoder
from fuselab.report.plots import rebuildable
from fuselab.train.config import ConfigError, make_config
from fuselab.train.run import execute

from conftest import run_cli, tiny_spec

TINY = tiny_spec("safe", hidden=16, epochs=2, baseline=False, threads=1)


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


_cli = run_cli  # (exit code, stdout, stderr) of `fuselab ARGS`


def _fuselab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fuselab.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _dead_owner() -> str:
    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{socket.gethostname()}:{pid.stdout.strip()}"


def test_a_pickle_planted_as_a_saved_state_never_runs_and_the_run_starts_afresh(tmp_path, data_root):
    marker = tmp_path / "pwned"
    spec = parse_spec({**TINY, "grid": {"fusion.name": ["concat"]}})
    store = Store(tmp_path / "store")
    (run,) = prepare(spec, store)
    with store.transaction() as conn:  # as a killed sweep leaves it, plus a state someone replaced
        conn.execute("UPDATE runs SET status='running', owner=?, heartbeat=0, attempts=1 WHERE id=?",
                     (_dead_owner(), run.run_id))
    partial = store.staging_dir(run.run_id)
    partial.mkdir(parents=True)
    torch.save({"model": _Payload(marker), "epoch": 0}, partial / "resume.pt")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**TINY, "grid": {"fusion.name": ["concat"]}}))
    result = _fuselab("compare", str(spec_file), "--store", str(store.root), "--jobs", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()
    assert store.status(run.run_id) == "done"
    folder = store.run_dir(run.run_id)
    attempts = json.loads((folder / "attempts.json").read_text())
    assert [(a["first_epoch"], a["epochs_trained"]) for a in attempts] == [(0, 2)]  # trained from the start
    assert "resume.pt" in (folder / "dropped-states.txt").read_text()


def test_the_training_loop_loads_saved_states_as_plain_tensors_only(tmp_path, data_root):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"model": _Payload(marker)}, run_dir / "resume.pt")
    cfg = make_config(None, ["data.views=[fou,kar]", "model.hidden=8", "train.epochs=1", "train.threads=1"])
    with pytest.raises(pickle.UnpicklingError):
        execute(cfg, run_dir, resumable=True)
    assert not marker.exists()


@pytest.mark.parametrize("encoder", [
    {"target": "os.system", "command": "touch {marker}"},
    {"target": "subprocess.Popen", "args": ["touch", "{marker}"]},
    {"target": "builtins.exec", "source": "open('{marker}', 'w')"},
])
def test_a_hostile_encoder_target_is_refused_before_it_is_called(tmp_path, data_root, encoder):
    marker = tmp_path / "pwned"
    encoder = {k: (v.format(marker=marker) if isinstance(v, str) else [x.format(marker=marker) for x in v])
               for k, v in encoder.items()}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "mfeat", "views": ["fou", "kar"]},
        "model": {"name": "custom-streams", "encoders": {"*": encoder}},
        "train": {"epochs": 1, "threads": 1},
    }))
    result = _fuselab("run", str(config), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nn.Module" in lines[0] and encoder["target"] in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # a failed run leaves nothing behind


def test_module_classes_and_allowed_factories_still_build(tmp_path):
    linear = build_encoder({"target": "torch.nn.Linear", "in_features": 4, "out_features": 3})
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (3, 4)

    @allow_encoder_factory("tests.tiny_factory")
    def tiny(width: int = 2) -> torch.nn.Module:
        return torch.nn.Linear(width, width)

    assert build_encoder({"target": "tests.tiny_factory", "width": 5}).weight.shape == (5, 5)
    with pytest.raises(ValueError, match="nn.Module"):
        build_encoder({"target": "collections.OrderedDict"})  # a class, but not a module
    with pytest.raises(ValueError, match="dotted import path"):
        build_encoder({"target": "os.system; rm"})


def test_a_report_never_rebuilds_a_tampered_stored_config(tmp_path, data_root):
    marker = tmp_path / "pwned"
    spec = parse_spec(TINY)
    store = Store(tmp_path / "store")
    plan = prepare(spec, store)
    assert [o.status for o in execute_plan(plan, store, jobs=1)] == ["done", "done"]
    tampered, clean = (store.run_dir(r.run_id) for r in plan)
    for folder in (tampered, clean):  # no FLOPs recorded anywhere: the report would have to count them
        (folder / "flops.json").unlink()
        metrics = json.loads((folder / "metrics.json").read_text())
        metrics.pop("flops")
        (folder / "metrics.json").write_text(json.dumps(metrics))
    config = yaml.safe_load((tampered / "config.yaml").read_text())
    config["model"] = {"name": "custom-streams",
                       "encoders": {"*": {"target": "os.system", "command": f"touch {marker}"}}}
    (tampered / "config.yaml").write_text(yaml.safe_dump(config))
    result = _fuselab("report", "safe", "--store", str(store.root), "--no-html")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()
    assert not (tampered / "flops.json").exists()  # not counted: its config names an import path
    assert json.loads((clean / "flops.json").read_text())["flops_per_sample"] > 0  # a registered model still is


def test_rebuildable_accepts_registered_ids_only():
    base = {"data": {"name": "mfeat"}, "model": {"name": "mlp-streams"}, "fusion": {"name": "concat"}}
    assert rebuildable(base)
    assert not rebuildable({**base, "model": {"name": "custom-streams", "encoders": {"*": {"target": "torch.nn.Identity"}}}})
    assert not rebuildable({**base, "model": {"name": "no-such-model"}})
    assert not rebuildable({**base, "fusion": {"name": "no-such-fusion"}})


@pytest.mark.parametrize("name", ["../../escape", "/tmp/fuselab-escape", "a/b", ".."])
def test_an_experiment_name_that_is_a_path_is_refused(tmp_path, capsys, name):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "name": name}))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _cli(capsys, "compare", str(spec), "--store", str(tmp_path / "store"), "--jobs", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a safe folder name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, in or out of the store
    assert not Path("/tmp/fuselab-escape").exists()


@pytest.mark.parametrize("method", ["../evil", "/abs", "a/../b", "back\\slash"])
def test_a_method_name_that_is_a_path_is_refused(method):
    with pytest.raises(ConfigError, match="not a safe label"):
        parse_spec({**TINY, "grid": {}, "variants": [{"name": method}]})


def test_method_labels_with_a_slash_stay_valid():
    spec = parse_spec({**TINY, "grid": {}, "variants": [{"name": "late/clean"}, {"name": "late/hard"}]})
    assert [m.name for m in spec.methods] == ["late/clean", "late/hard"]


def test_a_tampered_experiment_name_in_the_store_cannot_place_a_report_outside(tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(ConfigError, match="not a safe folder name"):
        store.report_dir("../../outside")
    assert store.report_dir("fine-name") == tmp_path / "store" / "fine-name" / "report"


def test_a_local_ray_instance_requires_the_users_token(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray") if os.environ.get("CI") != "true" else __import__("ray")
    from fuselab.experiments.ray_backend import run_tasks

    calls: list[tuple[dict, str | None]] = []
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append((kw, os.environ.get("RAY_AUTH_MODE"))))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "remote", lambda **kw: (lambda f: f))
    options = dict(address=None, threads=1, gpus_per_run=0.0, plugins=(), cpus=1)
    run_tasks([], Store(tmp_path / "s"), lambda *a: None, **options)
    (kwargs, mode), = calls
    assert mode == "token" and "address" not in kwargs  # a local instance, token authentication on
    calls.clear()
    run_tasks([], Store(tmp_path / "s"), lambda *a: None, **{**options, "address": "ray://head:10001"})
    assert calls[0][0]["address"] == "ray://head:10001"
