"""One training run from a resolved config: build dataset, model and loss, fit, write the run folder."""

from __future__ import annotations

import inspect
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from fuselab.data.core import DataBundle
from fuselab.losses import WeightedLoss
from fuselab.registry import DATASETS, MODELS
from fuselab.train.config import ConfigError, section
from fuselab.train.loop import FitResult, count_parameters, fit, make_fabric


@dataclass
class RunResult:
    metrics: dict[str, Any]  # test_* and val_* metrics, params, best_epoch, seconds
    history: list[dict[str, float]]
    fit: FitResult


def build_data(cfg: DictConfig) -> DataBundle:
    options = section(cfg, "data")
    name = options.pop("name")
    return DATASETS.get(name)(seed=int(cfg.seed), **options)


def build_model(cfg: DictConfig, data: DataBundle) -> torch.nn.Module:
    options = section(cfg, "model")
    name = options.pop("name")
    if any(t["name"] == "aux-unimodal" for t in section(cfg, "loss")["terms"]):
        options.setdefault("modality_heads", True)
    exchange = section(cfg, "exchange") if "exchange" in cfg else {}
    if exchange:
        options["exchange"] = exchange
    builder = MODELS.get(name)
    if "example" in inspect.signature(builder).parameters:  # builders that measure their encoders' outputs
        options["example"] = data.train.take(torch.arange(min(2, len(data.train))))[0]
    return builder(dims=data.dims, num_classes=data.num_classes, fusion=section(cfg, "fusion"), **options)


def environment(threads: int) -> dict[str, Any]:
    """What the run ran on: versions, threads, git revision, hardware."""
    versions = {}
    for pkg in ("torch", "lightning-fabric", "torchmetrics", "numpy", "fuselab"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path.cwd()
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {
        "torch_threads": threads,
        "versions": versions,
        "python": sys.version.split()[0],
        "git_revision": rev,
        "hardware": {
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "platform": platform.platform(),
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def execute(
    cfg: DictConfig,
    run_dir: Path | None = None,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    resumable: bool = False,
) -> RunResult:
    """Train one run. With ``run_dir``, write config.yaml, metrics.json, history.csv, predictions.npz,
    environment.json, the best checkpoint and the CSV (and optionally TensorBoard) logs there.
    ``resumable`` keeps a resumable training state in ``run_dir`` (removed when the run completes)."""
    tcfg = OmegaConf.to_object(cfg.train)
    if tcfg.threads:
        torch.set_num_threads(int(tcfg.threads))
    torch.set_flush_denormal(True)  # products of many small factors must not fall into slow subnormals
    start = time.perf_counter()
    loggers = []
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        from lightning_fabric.loggers import CSVLogger

        loggers.append(CSVLogger(str(run_dir), name="logs", version=""))
        if tcfg.tensorboard:
            from lightning_fabric.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version=""))
    fabric = make_fabric(tcfg, loggers)
    fabric.seed_everything(int(cfg.seed), verbose=False)
    data = build_data(cfg)
    try:
        model = build_model(cfg, data)
        loss = WeightedLoss(section(cfg, "loss")["terms"])
    except ValueError as exc:  # a shape or option problem found while building
        raise ConfigError(str(exc).splitlines()[0]) from None
    params = count_parameters(model)
    resume_path = run_dir / "resume.pt" if resumable and run_dir is not None else None
    result = fit(model, data, loss, tcfg, seed=int(cfg.seed), fabric=fabric, on_epoch=on_epoch, resume_path=resume_path)
    if resume_path is not None:
        resume_path.unlink(missing_ok=True)
    for logger in fabric.loggers:
        logger.finalize("success")
    metrics: dict[str, Any] = {f"test_{k}": v for k, v in result.test.items()}
    metrics.update({f"val_{k}": v for k, v in result.val.items()})
    metrics.update(params=params, best_epoch=result.best_epoch, epochs_run=len(result.history),
                   seconds=time.perf_counter() - start)
    if run_dir is not None:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        _write_json(run_dir / "metrics.json", metrics)
        _write_json(run_dir / "environment.json", environment(torch.get_num_threads()))
        pd.DataFrame(result.history).to_csv(run_dir / "history.csv", index=False)
        np.savez_compressed(run_dir / "predictions.npz", y_true=result.test_true.numpy(), y_pred=result.test_pred.numpy())
        if tcfg.checkpoint:
            torch.save(result.state_dict, run_dir / "checkpoint.pt")
    return RunResult(metrics=metrics, history=result.history, fit=result)
