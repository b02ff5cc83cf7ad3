"""The experiment loggers of a run: CSV always, TensorBoard and MLflow on request.

``train.logger`` names the trackers (``mlflow``, or a list such as ``[csv, mlflow]``); ``train.tensorboard``
still switches TensorBoard on. Every logger is a Lightning Fabric logger, so the training loop's
``fabric.log_dict`` reaches all of them.

Lightning Fabric has no MLflow logger. ``MLflowLogger`` below follows the behaviour of PyTorch Lightning's
``lightning.pytorch.loggers.MLFlowLogger`` (an ``MlflowClient``, the experiment looked up or created by name,
parameters flattened to dotted keys and sent in batches, the run ended with FINISHED or FAILED), without its
model checkpoint logging. Deliberate differences: the default store is a SQLite file in the run folder (MLflow
keeps its file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set), and a
run's final metrics are logged under ``final/`` so that they do not become one more point of the per-epoch
curves that share their names (``val_accuracy``).
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning_fabric.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning_fabric.utilities.rank_zero import rank_zero_only

from fuselab.errors import ConfigError
from fuselab.train.trackers import LOGGERS, MLFLOW_INSTALL, check_loggers, logger_names, mlflow_available  # noqa: F401

EXPERIMENT = "fuselab"  # the MLflow experiment that holds fuselab's runs
_FINAL_PREFIX = "final/"
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")  # MLflow keys: alphanumerics, _ - . space / :
_MAX_PARAMS_PER_BATCH = 100  # MLflow's limit on parameters in one log_batch request
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
STORE_DB = "fuselab.sqlite"  # the database of a result store (fuselab.experiments.store.DB_NAME)
_PARTIAL = re.compile(r"^\.partial-([0-9a-f]+)(?:-.+)?$")  # a store run's folder while it trains


def flatten_config(config: Any) -> dict[str, str]:
    """A run config as MLflow parameters: nested mappings become dotted keys (``train.lr``); every leaf is a
    string, strings as they are and other values (numbers, booleans, None, lists) as JSON."""
    from omegaconf import Container, OmegaConf

    if isinstance(config, Container):
        config = OmegaConf.to_container(config, resolve=True)
    out: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                walk(value, f"{name}.")
            else:
                out[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)

    walk(config, "")
    return out


def default_mlflow_uri(folder: Path) -> str:
    """The tracking store when ``train.mlflow_uri`` is not given: ``mlflow.db`` in ``folder`` (the run folder,
    or the result store's folder for a run of a store; see ``tracking_home``)."""
    return f"sqlite:///{(Path(folder) / 'mlflow.db').resolve()}"


class MLflowLogger(Logger):
    """A Lightning Fabric logger that writes one MLflow run: parameters, metrics per step, final metrics
    under ``final/`` and artifacts (the run's config file).

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///abs/path/mlflow.db``, ``http://host:5000``, ...).
        experiment: MLflow experiment name; created when it does not exist.
        run_name: the run's name in MLflow (fuselab gives the run folder's name).
        artifact_location: where a newly created experiment keeps its artifacts; ``None`` is the server's or
            MLflow's default.
        tags: run tags.
    """

    def __init__(self, *, tracking_uri: str, experiment: str = EXPERIMENT, run_name: str | None = None,
                 artifact_location: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if not mlflow_available():
            raise ConfigError(f"the MLflow logger needs the MLflow package; install the extra: {MLFLOW_INSTALL}")
        self._tracking_uri = tracking_uri
        self._experiment_name = experiment
        self._run_name = run_name
        self._artifact_location = artifact_location
        self._tags = dict(tags or {})
        self._client: Any = None
        self._run_id: str | None = None
        self._ended = False
        self._steps: set[int] = set()  # steps of the per-epoch metrics logged so far

    # the MLflow run is created on first use, so that a logger built on a rank that never logs costs nothing
    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            try:
                with _sqlite_lock(self._tracking_uri):  # the first client of a new database creates its tables
                    self._client = MlflowClient(tracking_uri=self._tracking_uri)
            except Exception as exc:  # noqa: BLE001 - an unknown scheme or a store that cannot be opened
                raise self._store_error(exc) from None
        return self._client

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            client = self.client
            try:
                with _sqlite_lock(self._tracking_uri):  # two new runs must not both create the experiment
                    experiment = client.get_experiment_by_name(self._experiment_name)
                    if experiment is not None:
                        experiment_id = experiment.experiment_id
                    else:
                        experiment_id = client.create_experiment(self._experiment_name,
                                                                 artifact_location=self._artifact_location)
                run = client.create_run(experiment_id, run_name=self._run_name, tags=self._tags)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - any store failure is a wrong URI or an unreachable store
                raise self._store_error(exc) from None
            self._run_id = run.info.run_id
            atexit.register(self._end_unfinished)  # a run that raised is marked FAILED, not left RUNNING
        return self._run_id

    def _store_error(self, exc: Exception) -> ConfigError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ConfigError(f"cannot open the MLflow tracking store '{self._tracking_uri}' ({first}); "
                           "check train.mlflow_uri")

    @property
    def name(self) -> str:
        return self._experiment_name

    @property
    def version(self) -> str:
        return self.run_id

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        from mlflow.entities import Param

        flat = flatten_config(vars(params) if hasattr(params, "__dict__") and not isinstance(params, Mapping) else params)
        items = [Param(_key(k), v[:_MAX_PARAM_LENGTH]) for k, v in flat.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _MAX_PARAMS_PER_BATCH], synchronous=True)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(_key(k), float(v), stamp, int(step or 0)) for k, v in metrics.items() if _is_number(v)]
        if not all(k.startswith(_FINAL_PREFIX) for k in metrics):
            self._steps.add(int(step or 0))
        for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + _MAX_METRICS_PER_BATCH], synchronous=True)

    @rank_zero_only
    def log_history(self, rows: list[dict[str, float]]) -> None:
        """The epochs of a run's history this logger has not seen: those trained before a resume, which the
        loop restored from the saved state instead of logging again."""
        for row in rows:
            epoch = int(row["epoch"])
            if epoch not in self._steps:
                self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    @rank_zero_only
    def log_final(self, metrics: Mapping[str, Any], artifacts: tuple[Path, ...] = ()) -> None:
        """A run's final numbers and files, after training: numeric metrics as ``final/<name>``, text
        values (diagnostic notes) as tags ``fuselab.<name>``, each artifact file at the run's artifact root."""
        self.log_metrics({f"{_FINAL_PREFIX}{k}": v for k, v in metrics.items() if _is_number(v)}, step=0)
        for key, value in metrics.items():
            if isinstance(value, str) and value:
                self.client.set_tag(self.run_id, _key(f"fuselab.{key}"), value[:_MAX_PARAM_LENGTH])
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self._end("FINISHED")

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._run_id is None:
            return
        self._end("FINISHED" if status in ("success", "finished") else "FAILED")

    def _end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)  # again after log_final: the end time covers it
        self._ended = True

    def _end_unfinished(self) -> None:
        if self._run_id is not None and not self._ended:
            quiet = logging.getLogger("mlflow")
            level = quiet.level
            quiet.setLevel(logging.CRITICAL)  # MLflow logs a store error with its traceback
            try:
                self.client.set_terminated(self._run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the interpreter is exiting; a store that went away is not an error
                pass
            finally:
                quiet.setLevel(level)


@contextlib.contextmanager
def _sqlite_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<database>.lock`` while a SQLite tracking store is opened: parallel runs
    (``fuselab compare --jobs N``) that open a new database together would otherwise each run MLflow's
    table migrations on it and fail. Other stores, and systems without ``fcntl``, are not locked."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None  # type: ignore[assignment]
    if fcntl is None or not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///")).resolve().with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _key(name: str) -> str:
    return _BAD_KEY_CHARS.sub("_", str(name))[:250]


def _is_number(value: Any) -> bool:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_loggers(run_dir: Path, train_cfg: Any, *, config: Any = None) -> list[Logger]:
    """The loggers of a run writing into ``run_dir``: CSV logs in ``logs/`` always; TensorBoard event files in
    ``tensorboard/`` with ``train.tensorboard`` (or ``tensorboard`` in ``train.logger``); an MLflow run with
    ``mlflow`` in ``train.logger``, in ``train.mlflow_uri`` or else in ``mlflow.db`` of the run folder or of its
    result store (artifacts in ``mlartifacts`` beside it; see ``tracking_home``), with ``config`` (the run
    config) as its parameters."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = logger_names(getattr(train_cfg, "logger", None))
    loggers: list[Logger] = [CSVLogger(str(run_dir), name="logs", version="")]
    if getattr(train_cfg, "tensorboard", False) or "tensorboard" in names:
        loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version=""))
    if "mlflow" in names:
        uri = getattr(train_cfg, "mlflow_uri", None)
        home, name, final_dir = tracking_home(run_dir)
        logger = MLflowLogger(
            tracking_uri=uri or default_mlflow_uri(home),
            run_name=name,
            artifact_location=_artifact_location(uri, home),
            tags={"fuselab.run_dir": str(final_dir.resolve())},
        )
        if config is not None:
            logger.log_hyperparams(flatten_config(config))
        loggers.append(logger)
    return loggers


def tracking_home(run_dir: Path) -> tuple[Path, str, Path]:
    """Where a run's default MLflow store lives, the run's name there and the run's final folder. A run of a
    result store (``<store>/runs/<id>``, trained in ``<store>/runs/.partial-<id>-<claim>`` and renamed when
    done) logs to the store's ``mlflow.db`` under its run id, so that one MLflow store holds a whole
    comparison; any other run logs to ``mlflow.db`` in its own folder, under the folder's name."""
    run_dir = Path(run_dir)
    runs = run_dir.parent
    if runs.name == "runs" and (runs.parent / STORE_DB).is_file():
        partial = _PARTIAL.match(run_dir.name)
        name = partial.group(1) if partial else run_dir.name
        return runs.parent, name, runs / name
    return run_dir, run_dir.name, run_dir


def _artifact_location(uri: str | None, run_dir: Path) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlartifacts`` beside a SQLite store (MLflow's own default
    is ``./mlruns`` in whatever folder the run started from); a server's or database's own default otherwise."""
    if uri is None:
        return (run_dir / "mlartifacts").resolve().as_uri()
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def log_run_end(loggers: list[Any], metrics: Mapping[str, Any], run_dir: Path) -> None:
    """After a run wrote its folder: the final metrics and the config file to the loggers that keep them."""
    config = Path(run_dir) / "config.yaml"
    history = Path(run_dir) / "history.csv"
    rows: list[dict[str, float]] = []
    if history.is_file():
        with open(history, newline="") as handle:
            rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
    for logger in loggers:
        if isinstance(logger, MLflowLogger):
            if rows and "fold" not in rows[0]:  # the folds of a cross-validation repeat their epochs
                logger.log_history(rows)
            logger.log_final(metrics, artifacts=(config,) if config.is_file() else ())
