"""One training run from a resolved config: build dataset, model and loss, fit, write the run folder."""

from __future__ import annotations

import dataclasses
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
from fuselab.train.loop import FitResult, count_parameters, fit
from fuselab.train.session import RunSession, build_data, build_model, prepare_run  # noqa: F401  (build_data, build_model: re-exported)


@dataclass
class RunResult:
    metrics: dict[str, Any]  # test_* and val_* metrics, params, best_epoch, seconds
    history: list[dict[str, float]]
    fit: FitResult


def pool_folds(results: list[FitResult], data: DataBundle) -> FitResult:
    """One result from the folds of a cross-validation: test metrics on the pooled test predictions (every
    labelled sample once), validation metrics averaged over the folds, the folds' histories one after another
    (with a ``fold`` column), the median best epoch and the folds' weights under ``fold<i>/``."""
    from fuselab.metrics import prediction_metrics

    pred = torch.cat([r.test_pred for r in results])
    true = torch.cat([r.test_true for r in results])
    test = {k: float(v) for k, v in prediction_metrics(data.task, pred, true, data.num_classes).items()}
    counts = torch.tensor([float(len(r.test_true)) for r in results])
    if all("loss" in r.test for r in results):
        test["loss"] = float(sum(r.test["loss"] * n for r, n in zip(results, counts.tolist())) / counts.sum().clamp_min(1))
    val = {k: float(np.mean([r.val[k] for r in results])) for k in results[0].val}
    history = [{"fold": i, **row} for i, r in enumerate(results) for row in r.history]
    state = {f"fold{i}/{k}": v for i, r in enumerate(results) for k, v in r.state_dict.items()}
    return FitResult(history=history, best_epoch=int(np.median([r.best_epoch for r in results])), val=val, test=test,
                     test_pred=pred, test_true=true, state_dict=state)


DIAGNOSTIC_SAMPLES = 256  # test samples (a seeded subset) on which a trained model's fusion is diagnosed


def diagnose(cfg: DictConfig, parts: list[DataBundle], results: list[FitResult], device: torch.device) -> dict[str, Any]:
    """Fusion diagnostics of the trained model of every fold (``fuselab.models.diagnostics``) on a seeded
    subset of its test split; numbers averaged over the folds, problems of any fold kept. A failure here
    never fails the run: it is recorded as ``diag_error``."""
    from fuselab.models.diagnostics import fusion_diagnostics

    per_fold: list[dict[str, Any]] = []
    try:
        for part, result in zip(parts, results):
            if len(part.test) == 0:  # one test sample is enough: a single scene is diagnosed on its tiles
                continue
            model = build_model(cfg, part)
            model.load_state_dict(result.state_dict)
            index = torch.randperm(len(part.test), generator=torch.Generator().manual_seed(int(cfg.seed)))
            x, _ = part.test.take(index[:DIAGNOSTIC_SAMPLES])
            model.to(device)
            per_fold.append(fusion_diagnostics(model, {m: v.to(device) for m, v in x.items()}, seed=int(cfg.seed)))
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not cost the user a finished run
        return {"diag_error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    if not per_fold:
        return {}
    out: dict[str, Any] = {}
    for key in per_fold[0]:
        values = [d[key] for d in per_fold if key in d]
        if isinstance(values[0], str):
            out[key] = "; ".join(dict.fromkeys(v for v in values if v))
        else:
            out[key] = float(np.mean(values))
    return out


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


def _fit_fold(session: RunSession, i: int, part: DataBundle, run_dir: Path | None, resumable: bool,
              on_epoch: Callable[[int, dict[str, float]], None] | None) -> tuple[FitResult, int]:
    """Train the model of fold ``i`` (the only one without cross-validation); (its result, its parameters).
    A resumable run keeps its training state in ``run_dir`` and, with folds, each finished fold's result."""
    if i:
        session.reseed()  # every fold starts from the same initialisation
    model = session.model(part)
    loss = session.loss()
    params = count_parameters(model)
    folds = len(session.parts)
    keep = resumable and run_dir is not None
    resume_path = run_dir / ("resume.pt" if folds == 1 else f"resume-fold{i}.pt") if keep else None
    finished = run_dir / f"finished-fold{i}.pt" if keep and folds > 1 else None
    if finished is not None and finished.is_file():  # a fold completed before the run was interrupted
        return FitResult(**torch.load(finished, weights_only=True)), params  # plain tensors and types: never runs code
    result = fit(model, part, loss, session.train, seed=session.seed, fabric=session.fabric, on_epoch=on_epoch,
                 resume_path=resume_path)
    if finished is not None:
        torch.save({f.name: getattr(result, f.name) for f in dataclasses.fields(result)}, finished)
    if resume_path is not None:
        resume_path.unlink(missing_ok=True)
    return result, params


def _metrics(cfg: DictConfig, result: FitResult, params: int, folds: int, diagnostics: dict[str, Any],
             seconds: float, in_sample: bool = False) -> dict[str, Any]:
    """What ``metrics.json`` holds: test_* and val_* metrics, size, epochs, time, diagnostics, and
    ``test_in_sample`` when the test split holds the training samples too."""
    metrics: dict[str, Any] = {f"test_{k}": v for k, v in result.test.items()}
    metrics.update({f"val_{k}": v for k, v in result.val.items()})
    metrics.update(params=params, best_epoch=result.best_epoch, epochs_run=len(result.history), seconds=seconds)
    if folds > 1:
        metrics["folds"] = folds
    metrics.update(diagnostics)
    if cfg.get("control", False):
        metrics["control"] = True
    if in_sample:
        metrics["test_in_sample"] = True
    return metrics


def _write_run(run_dir: Path, cfg: DictConfig, result: FitResult, metrics: dict[str, Any], checkpoint: bool) -> None:
    """The run folder's files (the loggers write theirs)."""
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    _write_json(run_dir / "metrics.json", metrics)
    _write_json(run_dir / "environment.json", environment(torch.get_num_threads()))
    if result.history:  # a method that is not trained (cva) has no history
        pd.DataFrame(result.history).to_csv(run_dir / "history.csv", index=False)
    np.savez_compressed(run_dir / "predictions.npz", y_true=result.test_true.numpy(), y_pred=result.test_pred.numpy())
    if checkpoint:
        torch.save(result.state_dict, run_dir / "checkpoint.pt")


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
    from fuselab.train.loggers import build_loggers, log_run_end

    tcfg = OmegaConf.to_object(cfg.train)
    loggers = build_loggers(run_dir, tcfg, config=cfg) if run_dir is not None else []
    start = time.perf_counter()  # after the loggers: opening a new MLflow store takes seconds that are not the run's
    try:
        session = prepare_run(cfg, loggers=loggers, launch=True)
        parts = session.parts  # cross-validation: one model per fold, test predictions pooled
        fitted = [_fit_fold(session, i, part, run_dir, resumable, on_epoch) for i, part in enumerate(parts)]
    except BaseException:  # a tracker's run ends FAILED now, not when the process exits (a sweep worker lives on)
        for logger in loggers:
            try:
                logger.finalize("failed")
            except Exception:  # noqa: BLE001 - the run's own error is the one to report
                pass
        raise
    results = [r for r, _ in fitted]
    diagnostics = diagnose(cfg, parts, results, session.fabric.device)
    result = results[0] if len(results) == 1 else pool_folds(results, session.data)
    if run_dir is not None:
        for i in range(len(parts) if len(parts) > 1 else 0):
            (run_dir / f"finished-fold{i}.pt").unlink(missing_ok=True)
    for logger in session.fabric.loggers:
        logger.finalize("success")
    metrics = _metrics(cfg, result, fitted[-1][1], len(parts), diagnostics, time.perf_counter() - start,
                       in_sample=session.data.test_in_sample)
    if run_dir is not None and session.fabric.is_global_zero:
        _write_run(run_dir, cfg, result, metrics, tcfg.checkpoint)
        log_run_end(session.fabric.loggers, metrics, run_dir)  # final metrics and config.yaml to MLflow
    return RunResult(metrics=metrics, history=result.history, fit=result)
