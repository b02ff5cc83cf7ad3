"""Execute an experiment's plan: skip finished runs, retry failed ones, run the rest in local processes.

Each run is claimed in the store by the process that trains it, so concurrent sweeps on one store and
re-runs after an interruption never train a run twice. A failing run is recorded with its error and the
sweep goes on.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from omegaconf import OmegaConf

from fuselab.experiments.spec import PlannedRun, Spec
from fuselab.experiments.store import Store

HEARTBEAT_SECONDS = 30.0


@dataclasses.dataclass
class Outcome:
    run_id: str
    method: str
    seed: int
    status: str  # done | failed | skipped (held by another live process) | cached (already done)
    metrics: dict[str, Any] | None = None
    error: str | None = None


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def train_one(store_root: str, run_id: str, method: str, seed: int, config: dict[str, Any], threads: int,
              plugins: tuple[str, ...] = ()) -> Outcome:
    """Claim, train and publish one run (in a worker process or in-process)."""
    from fuselab.plugins import load_plugins
    from fuselab.train.config import make_config
    from fuselab.train.run import execute  # imported in the worker

    load_plugins(plugins)  # a worker process starts with the built-ins only

    store = Store(store_root)
    if not store.claim(run_id):
        return Outcome(run_id, method, seed, "cached" if store.status(run_id) == "done" else "skipped")
    cfg = make_config(config, [f"train.threads={threads}"])
    staging = store.staging_dir(run_id)
    last_beat = [time.monotonic()]

    def beat(epoch: int, row: dict[str, float]) -> None:
        if time.monotonic() - last_beat[0] > HEARTBEAT_SECONDS:
            store.heartbeat(run_id)
            last_beat[0] = time.monotonic()

    try:
        result = execute(cfg, staging, on_epoch=beat, resumable=True)
        result.metrics["flops"] = record_flops(cfg, staging)
        store.publish(run_id, staging)
        store.finish(run_id, result.metrics)
        return Outcome(run_id, method, seed, "done", metrics=result.metrics)
    except Exception as exc:  # noqa: BLE001 - a failing run is recorded and the sweep goes on
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        store.fail(run_id, message + "\n" + traceback.format_exc())
        shutil.rmtree(staging, ignore_errors=True)  # a retry starts afresh
        return Outcome(run_id, method, seed, "failed", error=message)


_FLOPS: dict[str, float | None] = {}  # FLOPs per sample per model config, counted once per process
_FLOPS_DATA: dict[str, Any] = {}  # the last dataset built for counting


def record_flops(cfg: Any, run_dir: Any = None) -> float | None:
    """FLOPs per sample of a run's model (``report.plots.flops_per_sample``, attention counted), counted once
    per model config in this process and written to ``<run_dir>/flops.json`` and its ``metrics.json``;
    None when the model cannot be counted (a run never fails for it)."""
    import json
    from pathlib import Path

    from fuselab.report.plots import flops_per_sample
    from fuselab.train.run import build_data

    container = OmegaConf.to_container(cfg, resolve=True)
    key = json.dumps({k: container.get(k) for k in ("data", "model", "fusion", "exchange", "loss")}, sort_keys=True, default=str)
    if key not in _FLOPS:
        try:
            data_key = json.dumps(container.get("data"), sort_keys=True, default=str)
            if data_key not in _FLOPS_DATA:  # the split's seed does not change the count
                _FLOPS_DATA.clear()
                _FLOPS_DATA[data_key] = build_data(cfg)
            _FLOPS[key] = float(flops_per_sample(cfg, _FLOPS_DATA[data_key]))
        except Exception:  # noqa: BLE001 - a model the counter cannot trace still trains and reports
            _FLOPS[key] = None
    flops = _FLOPS[key]
    if run_dir is not None and flops is not None:
        folder = Path(run_dir)
        (folder / "flops.json").write_text(json.dumps({"flops_per_sample": flops, "counter": "torch.utils.flop_counter", "mode": "eval"}))
        metrics_file = folder / "metrics.json"
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            metrics["flops"] = flops
            metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    return flops


def prepare(spec: Spec, store: Store, *, on_trial: Callable[[str, Any], None] | None = None) -> list[PlannedRun]:
    """Check everything, then record the plan in the store (nothing is written when a check fails).

    Under ``budget: equal-trials`` each method is first tuned on validation with ``spec.trials`` trials
    (Optuna, SQLite under ``<store>/<experiment>/tune/``; resumed if interrupted) and its runs carry the best
    values found."""
    store.check_writable()
    plan = spec.plan()
    if spec.budget == "equal-trials":
        from fuselab.experiments.tune import apply_equal_trials

        apply_equal_trials(spec, store.root, on_trial=on_trial)
        plan = spec.plan()
    store.init()
    store.register_experiment(
        spec.name, spec.source, spec.baseline, spec.metric,
        [(r.run_id, r.method, r.seed, OmegaConf.to_container(r.config, resolve=True)) for r in plan],
    )
    return plan


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def execute_plan(
    plan: list[PlannedRun],
    store: Store,
    *,
    jobs: int,
    on_outcome: Callable[[Outcome], None] | None = None,
    plugins: list[str] | tuple[str, ...] = (),
    wait: bool = True,
    poll_seconds: float = 2.0,
    backend: str = "local",
    address: str | None = None,
    gpus_per_run: float = 0.0,
) -> list[Outcome]:
    """Train every run of ``plan`` that is not done; ``jobs`` processes, torch threads split between them.

    A run that another live process is training (a concurrent sweep, or the orphaned workers of a killed
    one) is waited for and then reported from the store, or trained here if its owner dies (``wait=False``
    reports it as ``skipped`` instead).
    """
    outcomes: list[Outcome] = []
    held: list[Outcome] = []

    def report(outcome: Outcome) -> None:
        if outcome.status == "skipped" and wait:
            held.append(outcome)
            return
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)

    seen: set[str] = set()
    todo: list[PlannedRun] = []
    for run in plan:
        if run.run_id in seen:
            continue
        seen.add(run.run_id)
        if store.status(run.run_id) == "done":
            report(Outcome(run.run_id, run.method, run.seed, "cached"))
        else:
            todo.append(run)
    threads = max(1, default_jobs() // max(1, jobs))
    args = {r.run_id: (str(store.root), r.run_id, r.method, r.seed, OmegaConf.to_container(r.config, resolve=True),
                       threads, tuple(plugins)) for r in todo}
    if backend == "ray" and args:
        from fuselab.experiments.ray_backend import run_tasks

        run_tasks(
            [(a[1], a[2], a[3], a[4]) for a in args.values()], store,
            lambda rid, method, seed, status, metrics, error: report(Outcome(rid, method, seed, status, metrics, error)),
            address=address, threads=threads, gpus_per_run=gpus_per_run, plugins=tuple(plugins), cpus=default_jobs(),
        )
    elif jobs <= 1 or len(todo) <= 1:
        _init_worker(threads)
        for a in args.values():
            report(train_one(*a))
    else:
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context,
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            for future in as_completed([pool.submit(train_one, *a) for a in args.values()]):
                report(future.result())
    while held:
        time.sleep(poll_seconds)
        waiting, held[:] = list(held), []
        for outcome in waiting:
            if store.status(outcome.run_id) == "done":
                report(dataclasses.replace(outcome, status="cached"))
            else:
                report(train_one(*args[outcome.run_id]))  # trains it if the owner is gone, else held again
    return outcomes
