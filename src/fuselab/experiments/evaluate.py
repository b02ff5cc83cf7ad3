"""Score finished runs on another data configuration: ``fuselab evaluate RUN|EXPERIMENT [key=value ...]``.

Legend: n samples or labelled pixels, k classes, f fold models of a run.

The run's config is read back with the overrides on top (``data.*``: another scene by path, another split
seed, another variant); every fold model of the run is loaded (``fuselab.train.session.load_run``) and
scored on the new data's test split:

- ``ensemble``: the mean of the fold models' class probabilities (a run without folds has one model);
- ``fold0`` ... ``fold<f-1>``: each fold model alone; ``single`` is their mean and std over the folds;
- ``pooled`` (when the new data is cross-validated, e.g. the run's own folds): fold i's model (a run's only
  model, if it has one) on fold i's test pixels, every labelled pixel once, which reproduces the run's test
  metrics.

A ``landsat-cd`` run evaluated on another scene (``data.images=...``) is scored on every labelled pixel of
that scene (``data.fold=all`` is implied unless ``data.fold`` is given).

Metrics are the task's (``fuselab.metrics``): accuracy (overall accuracy), Kappa, F1 and IoU of the change
class for change detection; accuracy and macro-F1 for classification.

Each evaluation is recorded beside the run it scores, as ``<run>/evaluations/<name>.json`` (written to a
temporary file and renamed, so a reader never sees half a file; the run's own files are never changed): the
overrides, the resolved data section, the number of scored samples and the metrics; ``<name>.npz`` beside it
holds which samples were predicted right (for the report's McNemar test). The name is given (``--name``) or
made from the overrides; a spec's ``evaluate:`` sets are scored after training by ``fuselab compare``
(:func:`evaluate_runs`), each run once per set. For an experiment, ``<store>/<experiment>/report/evaluate-<name>.md``
holds the table: mean +- std over seeds per method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from fuselab.data.core import IGNORE_INDEX
from fuselab.errors import ConfigError
from fuselab.metrics import METRICS, prediction_metrics
from fuselab.train.session import load_run_on, read_run_config

EVALUATIONS = "evaluations"  # folder of a run that holds its evaluations
LABELS = {"accuracy": "OA", "kappa": "Kappa", "f1_change": "F1 change", "iou_change": "IoU change",
          "macro_f1": "macro-F1", "miou": "mIoU"}


def evaluation_name(overrides: Sequence[str]) -> str:
    """A file-safe name from the overrides (``default`` without any)."""
    text = "_".join(overrides) if overrides else "default"
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "-", text).strip("-")
    if len(slug) > 80:
        import hashlib

        slug = slug[:60].rstrip("-") + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]
    return slug or "default"


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,99}", name):
        raise ConfigError(f"--name '{name}' must be letters, digits, '.', '_', '=', '-' (up to 100, no path separators)")
    return name


def evaluation_overrides(run_dir: str | Path, overrides: Sequence[str]) -> list[str]:
    """The overrides with what an evaluation implies: ``data.fold=all`` for a scene dataset scored on another scene."""
    items = list(overrides)
    keys = {o.split("=", 1)[0].strip() for o in items}
    cfg = read_run_config(run_dir, items)
    if str(cfg.data.name) == "landsat-cd" and "data.images" in keys and "data.fold" not in keys:
        items.append("data.fold=all")
    return items


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def score_run(run_dir: str | Path, overrides: Sequence[str] = (), *, device: str = "cpu",
              trust: bool = False) -> dict[str, Any]:
    """Metrics of a finished run on the data its config plus ``overrides`` describes (see the module docstring)."""
    items = evaluation_overrides(run_dir, overrides)
    run = load_run_on(run_dir, items, device=device, trust=trust)
    data, n_models = run.data, len(run.models)
    record: dict[str, Any] = {"overrides": items, "task": data.task, "models": n_models,
                              "data": OmegaConf.to_container(run.config.data, resolve=True)}
    folds = list(data.folds or [])
    if folds and n_models not in (1, len(folds)):
        raise ConfigError(f"run '{Path(run_dir).name}' has {n_models} fold models but the data has {len(folds)} folds; "
                          f"give data.folds={n_models}, or data.fold=all to score every model on every labelled pixel")
    if folds:  # cross-validated data: fold i's model (the only model) on fold i's held-out part, pooled
        preds, trues, per_fold = [], [], []
        for i, part in enumerate(folds):
            pred = run.predict(part.test.x, fold=i if n_models > 1 else 0).cpu()
            keep = part.test.y != IGNORE_INDEX
            preds.append(pred[keep])
            trues.append(part.test.y[keep])
            per_fold.append(_floats(prediction_metrics(data.task, pred, part.test.y, data.num_classes)))
        pred, true = torch.cat(preds), torch.cat(trues)
        record.update(mode="pooled", n=int(len(true)), folds=per_fold, correct=(pred == true).numpy(),
                      metrics=_floats(prediction_metrics(data.task, pred, true, data.num_classes)))
        return record
    split = data.test
    probs = [run.predict_proba(split.x, fold=i).cpu() for i in range(n_models)]
    target = split.y
    per_fold = [_floats(prediction_metrics(data.task, p.argmax(1), target, data.num_classes)) for p in probs]
    ensemble = torch.stack(probs).mean(0).argmax(1)
    keep = target != IGNORE_INDEX
    record.update(mode="ensemble", n=int(keep.sum()), folds=per_fold, correct=(ensemble[keep] == target[keep]).numpy(),
                  metrics=_floats(prediction_metrics(data.task, ensemble, target, data.num_classes)))
    if n_models > 1:
        record["single"] = {k: _mean_std([f[k] for f in per_fold]) for k in per_fold[0]}
    return record


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


def write_evaluation(run_dir: str | Path, name: str, record: dict[str, Any]) -> Path:
    """Record an evaluation as ``<run>/evaluations/<name>.json`` (atomically; replaces one of the same name).
    The record's ``correct`` (whether each scored sample was predicted right, in a fixed order) goes to
    ``<name>.npz`` beside it, written first: the report's McNemar test pairs it across methods."""
    import numpy as np

    folder = Path(run_dir) / EVALUATIONS
    folder.mkdir(exist_ok=True)
    path = folder / f"{check_name(name)}.json"
    record = dict(record)
    correct = record.pop("correct", None)
    if correct is not None:
        tmp = folder / f".{name}.{os.getpid()}.npz.tmp"
        with tmp.open("wb") as f:
            np.savez_compressed(f, correct=np.asarray(correct, dtype=bool).reshape(-1))
        os.replace(tmp, folder / f"{name}.npz")
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def read_correct(run_dir: str | Path, name: str) -> Any:
    """The per-sample correctness of an evaluation (a bool array), or None when it was not recorded."""
    import numpy as np

    file = Path(run_dir) / EVALUATIONS / f"{name}.npz"
    if not file.is_file():
        return None
    with np.load(file) as data:
        return data["correct"]


def evaluate_runs(runs: Sequence[dict[str, Any]], sets: dict[str, dict[str, Any]], *, device: str = "cpu",
                  on_run: Callable[[dict[str, Any], str, str], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Score every run (``run_id``, ``method``, ``seed``, ``dir``) on each named set of a spec's ``evaluate:``
    section (name -> dotted overrides), skipping those whose ``<run>/evaluations/<name>.json`` exists.
    Returns, per name, the rows evaluated now; a set a run cannot be scored on is reported to ``on_run``
    as ``failed: <reason>`` and the others go on."""
    from fuselab.train.config import dot_value

    done: dict[str, list[dict[str, Any]]] = {name: [] for name in sets}
    for name, overrides in sets.items():
        items = [f"{k}={dot_value(v)}" for k, v in overrides.items()]
        for run in runs:
            if (Path(run["dir"]) / EVALUATIONS / f"{name}.json").is_file():
                continue
            try:
                record = score_run(run["dir"], items, device=device)
            except ConfigError as exc:
                if on_run:
                    on_run(run, name, f"failed: {str(exc).splitlines()[0]}")
                continue
            record.update(name=name, run_id=run["run_id"], method=run["method"], seed=run["seed"], created=time.time())
            write_evaluation(run["dir"], name, record)
            record.pop("correct", None)
            done[name].append({"method": run["method"], "seed": run["seed"], "run_id": run["run_id"], "record": record})
            if on_run:
                on_run(run, name, "done")
    return done


def read_evaluations(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every evaluation recorded for a run, by name."""
    folder = Path(run_dir) / EVALUATIONS
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


@dataclasses.dataclass
class EvaluationResult:
    """The evaluated runs (one row each: method, seed, run id, the record), the table and where it was written."""

    name: str
    rows: list[dict[str, Any]]
    markdown: str
    files: dict[str, Path]
    errors: list[dict[str, Any]]


def metric_keys(task: str) -> list[str]:
    return [k for k in METRICS.get(task, ("accuracy",)) if k != "macro_f1" or task == "classification"]


def _pm(stats: dict[str, float], digits: int = 2) -> str:
    return f"{stats['mean'] * 100:.{digits}f} ± {stats['std'] * 100:.{digits}f}"


def evaluation_table(rows: list[dict[str, Any]], name: str) -> str:
    """Markdown: one row per method (and per way of combining fold models), metrics in % as mean ± std over
    seeds; ``n`` is the number of seeds."""
    if not rows:
        return f"No run was evaluated ({name})."
    task = rows[0]["record"]["task"]
    keys = metric_keys(task)
    methods: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        methods.setdefault(row["method"], []).append(row["record"])
    labels = {**LABELS, "accuracy": "accuracy"} if task == "classification" else LABELS
    lines = [f"| method | models | seeds | scored | {' | '.join(labels.get(k, k) for k in keys)} |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for method, records in methods.items():
        mode = records[0]["mode"]
        if records[0]["models"] == 1:
            mode = "one model, pooled over folds" if mode == "pooled" else "one model"
        modes = [(mode, [r["metrics"] for r in records])]
        if records[0]["mode"] == "ensemble" and records[0]["models"] > 1:
            modes[0] = ("fold ensemble", modes[0][1])
            modes.append(("single fold (mean over folds)", [{k: r["single"][k]["mean"] for k in keys} for r in records]))
        for mode, values in modes:
            cells = [_pm(_mean_std([v[k] for v in values])) for k in keys]
            lines.append(f"| {method} | {mode} | {len(values)} | {records[0]['n']:,} | {' | '.join(cells)} |")
    return "\n".join(lines)


def evaluate_target(target: str, overrides: Sequence[str] = (), *, store: str | Path = "runs",
                    name: str | None = None, device: str = "cpu", trust: bool = False,
                    on_run: Callable[[dict[str, Any], str], None] | None = None) -> EvaluationResult:
    """Evaluate a run folder, or every done run of the experiment ``target`` in ``store``, on the data the
    overrides describe; record each evaluation beside its run and return the table."""
    name = check_name(name) if name else evaluation_name(overrides)
    path = Path(target)
    if (path / "config.yaml").is_file():
        cfg = read_run_config(path)
        method = str(cfg.model.name) if str(cfg.model.name) in ("cva", "cen") else str(cfg.fusion.name)
        runs = [{"run_id": path.name, "method": method, "seed": int(cfg.seed), "dir": path}]
        report = None
    else:
        from fuselab.experiments.store import Store

        st = Store(store)
        if not st.exists() and path.exists():
            read_run_config(path)  # a folder that is not a run: its own one-line error
        st.experiment(target)  # unknown store or experiment: one line
        runs = [{**r, "dir": st.run_dir(r["run_id"])} for r in st.experiment_runs(target) if r["status"] == "done"]
        if not runs:
            raise ConfigError(f"experiment '{target}' has no finished run in '{store}'; run `fuselab compare` first")
        report = st.report_dir(target)
    rows, errors = [], []
    for run in runs:
        try:
            record = score_run(run["dir"], overrides, device=device, trust=trust)
        except ConfigError as exc:
            if len(runs) == 1:
                raise
            errors.append({"method": run["method"], "seed": run["seed"], "error": str(exc).splitlines()[0]})
            if on_run:
                on_run(run, "failed")
            continue
        record.update(name=name, run_id=run["run_id"], method=run["method"], seed=run["seed"], created=time.time())
        write_evaluation(run["dir"], name, record)
        record.pop("correct", None)  # recorded beside the JSON file; the rows hold what the file holds
        rows.append({"method": run["method"], "seed": run["seed"], "run_id": run["run_id"], "record": record})
        if on_run:
            on_run(run, "done")
    markdown = evaluation_table(rows, name)
    files: dict[str, Path] = {}
    if report is not None and rows:
        report.mkdir(parents=True, exist_ok=True)
        files["markdown"] = report / f"evaluate-{name}.md"
        command = " ".join(["fuselab evaluate", target, *overrides])
        files["markdown"].write_text(f"# {target} evaluated: {name}\n\n`{command}`\n\n{markdown}\n")
    return EvaluationResult(name, rows, markdown, files, errors)


__all__ = [
    "EVALUATIONS", "EvaluationResult", "evaluate_runs", "evaluate_target", "evaluation_name", "evaluation_overrides", "evaluation_table",
    "read_correct", "read_evaluations", "score_run", "write_evaluation",
]
