"""Which experiment trackers a run config asks for (``train.logger``), checked with the config: a light module
(no Lightning, no MLflow import) so that checking a config never loads them; ``train.loggers`` builds them."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from fuselab.errors import ConfigError

LOGGERS = ("csv", "tensorboard", "mlflow")
MLFLOW_INSTALL = "pip install 'fuselab[mlflow]'"


def logger_names(value: Any) -> list[str]:
    """The trackers a ``train.logger`` value asks for: one name or a list of names, in order, without
    duplicates; ``None`` or an empty list means CSV only."""
    if value is None:
        items: list[Any] = []
    elif isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, Mapping)):
        items = list(value)
    else:
        raise ConfigError(f"config key 'train.logger' must be a name or a list of names ({', '.join(LOGGERS)}), "
                          f"got {value!r}")
    names = []
    for item in items:
        name = str(item).strip().lower()
        if name not in LOGGERS:
            raise ConfigError(f"config key 'train.logger' names '{item}'; choose from {', '.join(LOGGERS)} "
                              "(one name or a list of them), e.g. train.logger=mlflow")
        if name not in names:
            names.append(name)
    return names


def mlflow_available() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def check_loggers(train: Any) -> None:
    """Check ``train.logger`` and ``train.mlflow_uri`` before anything runs: known names, the MLflow
    package installed when it is asked for, a tracking URI only with the MLflow logger."""
    names = logger_names(train.logger)
    if "mlflow" in names and not mlflow_available():
        raise ConfigError(f"train.logger=mlflow needs the MLflow package; install the extra: {MLFLOW_INSTALL}")
    if train.mlflow_uri is not None and "mlflow" not in names:
        raise ConfigError("config key 'train.mlflow_uri' is used by the MLflow logger only; "
                          "add mlflow to train.logger, e.g. train.logger=mlflow")
