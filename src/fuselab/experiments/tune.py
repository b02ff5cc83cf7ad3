"""Hyper-parameter tuning with Optuna, on validation only.

A spec's ``search`` block gives the space, one entry per dotted config key::

    search:
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      fusion.rank: {int: [2, 32]}
      model.dropout: {uniform: [0.0, 0.5]}
      model.norm: {choice: [layer, batch]}

(kinds: ``loguniform``, ``uniform``, ``int``, ``logint``, ``choice``). A key applies to the methods whose
config has it (``fusion.rank`` only to the low-rank fusions). Each method is its own Optuna study, named
``<spec>/<method>/<hash of its config and space>``, in SQLite storage under the store by default or in any
Optuna RDB URL (several machines running ``fuselab tune`` on one URL share the trials; a study stops at the
requested number of finished trials, counted over all of them).

A trial trains on the first seed's training split and is scored on its validation split (the spec's
``metric``, ``direction``); the validation curve feeds Optuna's median pruner. The test split is sealed
before a trial sees the data: any use of it raises :class:`SealedSplitError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fuselab.data.core import DataBundle, ModalTensors
from fuselab.errors import ConfigError
from fuselab.experiments.spec import Spec
from fuselab.experiments.space import KINDS, Param, check_space, method_space, parse_space, suggest  # noqa: F401  (re-exported)
from fuselab.train.config import apply_overrides

FINISHED = ("COMPLETE", "PRUNED", "FAIL")  # trial states that count against a study's budget


# ----------------------------------------------------------------------------------------------
# the test split, sealed
# ----------------------------------------------------------------------------------------------


class SealedSplitError(RuntimeError):
    """Something read the test split while tuning."""


class SealedSplit(ModalTensors):
    """Stands in for the test split while tuning: reading any of it raises :class:`SealedSplitError`."""

    def __init__(self) -> None:  # no tensors at all
        pass

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__") and name not in ("__len__", "__iter__", "__getitem__"):
            return object.__getattribute__(self, name)
        raise SealedSplitError(f"the test split was read ('{name}') during tuning; trials see train and val only")

    def __len__(self) -> int:
        raise SealedSplitError("the test split was read (len) during tuning; trials see train and val only")


def seal_test(data: DataBundle) -> DataBundle:
    """The bundle with its test split sealed (cross-validation: the first fold, sealed)."""
    if data.folds:
        data = data.folds[0]
    return dataclasses.replace(data, test=SealedSplit(), folds=None)


# ----------------------------------------------------------------------------------------------
# the Optuna loop
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Clock:
    """Where a tuning run's time went: ``wall`` in ``study.optimize``, ``compute`` per trial in the objective
    (Optuna's own calls during the trial excluded). Bookkeeping is the rest."""

    wall: float = 0.0
    compute: list[float] = dataclasses.field(default_factory=list)
    # per trial: Optuna's time before the objective (sampling, storage, the previous trial's tell) plus its
    # calls inside the objective
    overhead: list[float] = dataclasses.field(default_factory=list)
    last: float = 0.0

    @property
    def bookkeeping(self) -> float:
        return max(0.0, self.wall - sum(self.compute))

    @property
    def bookkeeping_share(self) -> float:
        return self.bookkeeping / self.wall if self.wall > 0 else math.nan


Objective = Callable[[dict[str, Any], Callable[[int, float], None]], float]


def _storage(url: str | None) -> Any:
    """An Optuna storage for a URL; SQLite in WAL mode without a sync per commit (a trial reports every few
    epochs: a synced commit each time would cost more than the pruning saves on a small dataset)."""
    if url is None or not url.startswith("sqlite"):
        return url
    import optuna
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened from now on get the pragmas
    return storage


REPORTS_PER_TRIAL = 10  # intermediate values a trial reports to the pruner at most (evenly over its epochs)


def optimize(
    objective: Objective,
    space: Sequence[Param],
    *,
    trials: int,
    direction: str = "maximize",
    storage: str | None = None,
    study_name: str = "fuselab",
    pruner: Any = None,
    seed: int = 0,
    catch: tuple[type[BaseException], ...] = (),
    on_trial: Callable[[Any], None] | None = None,
) -> tuple[Any, Clock]:
    """Run an Optuna study until it holds ``trials`` finished trials (complete, pruned or failed).

    ``objective(values, report)`` gets one value per parameter and returns the score; it calls
    ``report(step, value)`` with intermediate scores (epochs), which raises ``optuna.TrialPruned`` when the
    pruner stops the trial. ``storage`` None keeps the study in memory. The study is loaded if it exists,
    so an interrupted run resumes, and processes sharing a storage URL share the budget.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=_storage(storage), study_name=study_name, direction=direction, load_if_exists=True,
        pruner=pruner if pruner is not None else optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2),
        sampler=optuna.samplers.TPESampler(seed=None),
    )
    states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED)
    finished = len(study.get_trials(deepcopy=False, states=states))
    # a different stream on every resume (and reproducible from the count of finished trials)
    study.sampler = optuna.samplers.TPESampler(seed=seed + finished)
    clock = Clock()

    def wrapped(trial: Any) -> float:
        inside = [0.0]

        def report(step: int, value: float) -> None:
            t = time.perf_counter()
            trial.report(float(value), step)
            prune = trial.should_prune()
            inside[0] += time.perf_counter() - t
            if prune:
                raise optuna.TrialPruned()

        values = suggest(trial, space)
        start = time.perf_counter()
        try:
            return objective(values, report)
        finally:
            end = time.perf_counter()
            clock.compute.append(end - start - inside[0])
            clock.overhead.append(start - clock.last + inside[0])
            clock.last = end

    callbacks = [optuna.study.MaxTrialsCallback(trials, states=states)]
    if on_trial is not None:
        callbacks.append(lambda study, trial: on_trial(trial))
    start = clock.last = time.perf_counter()
    if trials > finished:
        study.optimize(wrapped, n_trials=trials - finished, callbacks=callbacks, catch=catch, gc_after_trial=False)
    clock.wall = time.perf_counter() - start
    return study, clock


# ----------------------------------------------------------------------------------------------
# tuning a spec's methods
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MethodTuning:
    method: str
    study: str
    params: dict[str, Any]  # best values (empty when nothing applies to the method)
    value: float  # best validation score
    trials: int  # finished trials in the study
    pruned: int
    failed: int
    clock: Clock


def default_storage(store: str | Path, experiment: str) -> str:
    """SQLite storage beside the experiment's report: ``<store>/<experiment>/tune/optuna.sqlite``."""
    folder = Path(store) / experiment / "tune"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'optuna.sqlite').resolve()}"


def validation_objective(spec: Spec, method: str, *, seed: int | None = None,
                         build_data: Callable[[Any], DataBundle] | None = None) -> Objective:
    """The objective of one method: train on ``seed``'s (default: the first seed's) training split with the
    trial's values and return the validation ``spec.metric`` of the selected checkpoint. The data is built
    once (per data section) and its test split sealed before any trial sees it."""
    from fuselab.train.loop import fit
    from fuselab.train.session import cached_data, data_key, prepare_run

    seed = spec.seeds[0] if seed is None else seed
    build = build_data or cached_data
    fixed = spec.method_overrides(method)
    metric = spec.metric
    sealed: dict[str, DataBundle] = {}  # the process cache holds the bundle; the sealed view is kept here

    def objective(values: dict[str, Any], report: Callable[[int, float], None]) -> float:
        overrides = {**fixed, **values}
        cfg = apply_overrides(spec.base, overrides, seed=seed)
        key = data_key(cfg)
        if key not in sealed:
            sealed[key] = seal_test(build(cfg))
        session = prepare_run(cfg, data=sealed[key])
        tcfg, fabric = session.train, session.fabric
        model = session.model()
        loss = session.loss()

        every = max(1, tcfg.epochs // REPORTS_PER_TRIAL)

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            if (epoch + 1) % every == 0 or epoch + 1 == tcfg.epochs:
                report(epoch, row[f"val_{metric}"])

        result = fit(model, session.data, loss, tcfg, seed=seed, fabric=fabric, on_epoch=on_epoch, evaluate_test=False)
        return float(result.val[metric])

    return objective


def study_name(spec: Spec, method: str, space: Sequence[Param]) -> str:
    """``<spec>/<method>/<hash>``: the hash covers the method's resolved config (first seed), the space, the
    metric and the direction, so a changed spec starts a new study instead of mixing objectives."""
    from omegaconf import OmegaConf

    cfg = spec.config(method, spec.seeds[0])
    blob = json.dumps({"config": OmegaConf.to_container(cfg, resolve=True), "space": [dataclasses.asdict(p) for p in space],
                       "metric": spec.metric, "direction": spec.direction}, sort_keys=True, default=str)
    return f"{spec.name}/{method}/{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def tune_spec(
    spec: Spec,
    *,
    trials: int | None = None,
    storage: str | None = None,
    store: str | Path = "runs",
    methods: Sequence[str] | None = None,
    on_trial: Callable[[str, Any], None] | None = None,
    build_data: Callable[[Any], DataBundle] | None = None,
) -> dict[str, MethodTuning]:
    """Tune every method of ``spec`` (or those named) with ``trials`` trials each (default: ``spec.trials``)
    on validation; returns per method its best values. ``storage`` defaults to SQLite under ``store``."""
    import optuna

    from fuselab.train.loop import NonFiniteLossError

    if not spec.search:
        raise ConfigError(f"spec '{spec.name}' has no search block; add e.g. "
                          "search: {train.lr: {loguniform: [1.0e-4, 1.0e-2]}}")
    names = list(methods) if methods else [m.name for m in spec.methods]
    for name in names:
        spec.method_overrides(name)  # unknown names fail here, before any trial
    trials = spec.trials if trials is None else trials
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    storage = storage or default_storage(store, spec.name)
    out: dict[str, MethodTuning] = {}
    for name in names:
        space = method_space(spec, name)
        if not space:  # nothing to tune for this method
            out[name] = MethodTuning(name, "", {}, math.nan, 0, 0, 0, Clock())
            continue
        label = study_name(spec, name, space)
        study, clock = optimize(
            validation_objective(spec, name, build_data=build_data), space, trials=trials,
            direction=spec.direction, storage=storage, study_name=label, catch=(NonFiniteLossError,),
            on_trial=(lambda t, n=name: on_trial(n, t)) if on_trial else None,
        )
        states = optuna.trial.TrialState
        done = study.get_trials(deepcopy=False, states=(states.COMPLETE,))
        if not done:
            raise ConfigError(f"no trial of method '{name}' finished (all pruned or failed); widen the search")
        best = study.best_trial
        count = lambda s: len(study.get_trials(deepcopy=False, states=(s,)))  # noqa: E731
        out[name] = MethodTuning(name, label, dict(best.params), float(best.value),
                                 count(states.COMPLETE) + count(states.PRUNED) + count(states.FAIL),
                                 count(states.PRUNED), count(states.FAIL), clock)
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def tuned_spec(spec: Spec, results: dict[str, MethodTuning]) -> dict[str, Any]:
    """A spec that runs the tuned methods over the spec's seeds: one variant per method with its own
    overrides, its matched width (``match_params``) and its best values; no search, equal epochs."""
    source = spec.source or {}
    variants = []
    for name, result in results.items():
        overrides = {**spec.method_overrides(name), **result.params}
        variants.append({"name": name, **_nest(overrides)})
    trials = max((r.trials for r in results.values()), default=0)
    note = (f"Tuned on validation (seed {spec.seeds[0]}): {trials} Optuna trials per method, "
            f"{spec.direction} val {spec.metric}.")
    raw: dict[str, Any] = {
        "name": f"{spec.name}-tuned",
        "description": f"{spec.description} {note}".strip(),
        "base": spec.base,
        "variants": variants,
        "seeds": list(spec.seeds),
        "baseline": spec.baseline if spec.baseline in results else variants[0]["name"],
        "metric": spec.metric,
    }
    if source.get("plugins"):
        raw["plugins"] = list(spec.plugins)  # resolved: the written spec may live elsewhere
    return raw


def write_tuned_spec(spec: Spec, results: dict[str, MethodTuning], path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(tuned_spec(spec, results), sort_keys=False, allow_unicode=True))
    tmp.replace(path)
    return path


def apply_equal_trials(spec: Spec, store: str | Path, *, storage: str | None = None,
                       on_trial: Callable[[str, Any], None] | None = None) -> dict[str, MethodTuning]:
    """``budget: equal-trials``: tune each method with ``spec.trials`` trials and make its best values part
    of its overrides (``spec.tuned``), so the planned runs carry them."""
    spec.tuned = {}  # the studies are named after the untuned configs
    results = tune_spec(spec, storage=storage, store=store, on_trial=on_trial)
    spec.tuned = {name: dict(r.params) for name, r in results.items()}
    return results
