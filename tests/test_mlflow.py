"""MLflow logging (train.logger=mlflow): a real run read back with MLflow's client equals its run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fuselab.cli import main
from fuselab.experiments.spec import run_id
from fuselab.train.config import ConfigError, make_config
from fuselab.train.loggers import MLflowLogger, flatten_config
from fuselab.train.run import execute

SMALL = ["data.views=[fou,kar,zer]", "model.hidden=32", "train.epochs=6", "train.threads=1", "train.batch_size=128"]


@pytest.fixture(scope="module")
def mlflow():
    try:
        import mlflow
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("mlflow is not installed; the dev extra must install it")
        pytest.skip("mlflow is not installed (pip install '.[mlflow]')")
    return mlflow


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _only_run(client, experiment: str = "fuselab"):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment '{experiment}'"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_a_run_logged_to_mlflow_equals_its_folder(mlflow, tmp_path):
    folder = tmp_path / "run"
    result = execute(make_config(None, [*SMALL, "train.logger=mlflow"]), folder)
    assert result.metrics["test_accuracy"] > 0.85  # it still learns (chance is 0.10)
    assert (folder / "mlflow.db").is_file() and (folder / "logs" / "metrics.csv").is_file()
    client = _client(f"sqlite:///{folder / 'mlflow.db'}")
    run = _only_run(client)
    assert run.info.run_name == "run" and run.info.status == "FINISHED"

    # parameters: the flattened run config, exactly
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert run.data.params == flatten_config(config)
    assert run.data.params["train.epochs"] == "6" and run.data.params["data.views"] == '["fou", "kar", "zer"]'
    assert run.data.params["train.logger"] == "mlflow" and run.data.params["loss.terms"] == '[{"name": "ce", "weight": 1.0}]'

    # per-epoch metrics: every column of history.csv, one value per epoch, at step = epoch
    history = pd.read_csv(folder / "history.csv")
    columns = [c for c in history.columns if c != "epoch"]
    assert {"train_loss", "val_accuracy", "lr"} <= set(columns)
    for column in columns:
        logged = sorted(client.get_metric_history(run.info.run_id, column), key=lambda m: m.step)
        assert [m.step for m in logged] == list(history["epoch"]), column
        assert [m.value for m in logged] == pytest.approx(list(history[column]), rel=1e-12, abs=0), column

    # final metrics: every number of metrics.json under final/, nothing else there
    metrics = json.loads((folder / "metrics.json").read_text())
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final = {k.removeprefix("final/"): v for k, v in run.data.metrics.items() if k.startswith("final/")}
    assert set(final) == set(numbers) and {"test_accuracy", "val_accuracy", "best_epoch", "params"} <= set(final)
    assert final == pytest.approx(numbers, rel=1e-12, abs=0)
    # the curve keeps the epochs: the final (best-epoch) val_accuracy is not appended to it
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 6

    # the run config file is an artifact, byte for byte
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    copy = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert copy.read_text() == (folder / "config.yaml").read_text()
    assert run.info.artifact_uri.startswith((folder / "mlartifacts").resolve().as_uri())


def test_a_list_of_loggers_and_a_shared_tracking_uri(mlflow, tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    overrides = [*SMALL, "train.epochs=2", "train.logger=[csv,tensorboard,mlflow]", f"train.mlflow_uri={uri}"]
    for seed in (0, 1):
        execute(make_config(None, [*overrides, f"seed={seed}"]), tmp_path / f"seed{seed}")
    for seed in (0, 1):
        folder = tmp_path / f"seed{seed}"
        assert (folder / "logs" / "metrics.csv").is_file() and any((folder / "tensorboard").iterdir())
        assert not (folder / "mlflow.db").exists()  # the given store is used, not one in the run folder
    client = _client(uri)
    experiment = client.get_experiment_by_name("fuselab")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["seed0", "seed1"]
    assert {r.data.params["seed"] for r in runs.values()} == {"0", "1"}
    for name, r in runs.items():
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert r.data.metrics["final/test_accuracy"] == pytest.approx(metrics["test_accuracy"], rel=1e-12)
    # artifacts beside the given SQLite store, not in ./mlruns of whatever folder the run started from
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert sorted(p.name for p in (tmp_path / "mlartifacts").rglob("config.yaml")) == ["config.yaml", "config.yaml"]


def test_the_logger_does_not_change_a_run_id():
    plain = make_config(None, SMALL)
    tracked = make_config(None, [*SMALL, "train.logger=[csv,mlflow]", "train.mlflow_uri=sqlite:////tmp/x.db"])
    assert run_id(plain) == run_id(tracked)


def test_a_failed_run_is_marked_failed(mlflow, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLflowLogger(tracking_uri=uri, run_name="broken", artifact_location=(tmp_path / "artifacts").as_uri())
    logger.log_metrics({"train_loss": 2.5, "note": "text is not a metric"}, step=0)
    logger.finalize("failed")
    run = _only_run(_client(uri))
    assert run.info.run_name == "broken" and run.info.status == "FAILED"
    assert run.data.metrics == {"train_loss": 2.5}


def _cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    assert len(out.err.strip().splitlines()) == 1, out.err
    return info.value.code, out.err


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.logger=mlfow"], "config key 'train.logger' names 'mlfow'; choose from csv, tensorboard, mlflow"),
        (["train.logger={name: mlflow}"], "config key 'train.logger' must be a name or a list of names"),
        (["train.mlflow_uri=sqlite:////tmp/x.db"], "config key 'train.mlflow_uri' is used by the MLflow logger only"),
    ],
)
def test_bad_logger_keys_are_one_clear_error(capsys, overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        make_config(None, overrides)
    code, err = _cli(capsys, "run", *overrides, "train.epochs=1")
    assert code == 2 and message in err


def test_a_bad_tracking_uri_is_one_line(mlflow, capsys, tmp_path):
    code, err = _cli(capsys, "run", *SMALL, "train.epochs=1", "train.logger=mlflow", "train.mlflow_uri=bogus://x",
                     "--out", str(tmp_path))
    assert code == 2 and "cannot open the MLflow tracking store 'bogus://x'" in err and "train.mlflow_uri" in err


def test_missing_mlflow_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match=r"install the extra: pip install 'fuselab\[mlflow\]'"):
        make_config(None, ["train.logger=[csv,mlflow]"])
    code, err = _cli(capsys, "run", "train.logger=mlflow", "train.epochs=1")
    assert code == 2 and "pip install 'fuselab[mlflow]'" in err  # the brackets survive the terminal's markup


def test_a_resumed_run_logs_every_epoch(mlflow, tmp_path):
    cfg = make_config(None, [*SMALL, "train.epochs=5", "train.checkpoint_every=0", "train.logger=mlflow"])

    class Killed(Exception):
        pass

    def kill_at_epoch_3(epoch, row):
        if epoch == 3:
            raise Killed

    with pytest.raises(Killed):
        execute(cfg, tmp_path, on_epoch=kill_at_epoch_3, resumable=True)
    execute(cfg, tmp_path, resumable=True)  # epochs 0-2 come from the saved state, not from the loop
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    finished = client.search_runs([client.get_experiment_by_name("fuselab").experiment_id],
                                  filter_string="attributes.status = 'FINISHED'")
    assert len(finished) == 1
    history = pd.read_csv(tmp_path / "history.csv")
    logged = sorted(client.get_metric_history(finished[0].info.run_id, "val_loss"), key=lambda m: m.step)
    assert [m.step for m in logged] == [0, 1, 2, 3, 4]
    assert [m.value for m in logged] == pytest.approx(list(history["val_loss"]), rel=1e-12, abs=0)


def test_the_runs_of_a_comparison_share_the_store_s_mlflow_db(mlflow, tmp_path):
    from conftest import tiny_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(threads=1, logger="mlflow")))
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "fuselab.cli", "compare", str(spec), "--store", str(store), "--jobs", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # two runs at once open one new store
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = _client(f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fuselab").experiment_id])
    folders = sorted(p.name for p in (store / "runs").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(folders) == 2 and sorted(r.info.run_name for r in runs) == folders  # run ids, not staging names
    for run in runs:
        folder = store / "runs" / run.info.run_name
        assert run.info.status == "FINISHED" and run.data.tags["fuselab.run_dir"] == str(folder.resolve())
        metrics = json.loads((folder / "metrics.json").read_text())
        assert run.data.metrics["final/test_accuracy"] == pytest.approx(metrics["test_accuracy"], rel=1e-12)
        assert run.data.params["fusion.name"] in ("concat", "sum") and not (folder / "mlflow.db").exists()
        copy = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
        assert copy.read_text() == (folder / "config.yaml").read_text()
    # the logger is an execution detail: without it the same spec finds its runs finished
    spec.write_text(yaml.safe_dump(tiny_spec(threads=1)))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 trained, 2 already in the store" in again.stdout, again.stderr[-2000:]


def test_a_run_that_raises_is_marked_failed_at_once(mlflow, tmp_path, monkeypatch):
    """A sweep worker lives on after a failed run (and leaves without the interpreter's exit handlers), so
    the MLflow run must end FAILED when the run raises, not when the process exits."""
    import fuselab.train.run as run_module

    def broken(*args, **kwargs):
        raise RuntimeError("diverged")

    monkeypatch.setattr(run_module, "_fit_fold", broken)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_config(None, [*SMALL, "train.logger=[csv,mlflow]", f"train.mlflow_uri={uri}"])
    with pytest.raises(RuntimeError, match="diverged"):
        execute(cfg, run_dir=tmp_path / "run")
    assert _only_run(_client(uri)).info.status == "FAILED"
