"""Tuning with Optuna (toy objectives and tiny real runs), the sealed test split and the fairness modes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from fuselab.data.core import ModalTensors
from fuselab.experiments.fairness import TOLERANCE
from fuselab.experiments.runner import prepare
from fuselab.experiments.spec import parse_spec
from fuselab.experiments.store import Store
from fuselab.experiments.tune import (
    SealedSplit,
    SealedSplitError,
    optimize,
    parse_space,
    tune_spec,
    write_tuned_spec,
)
from fuselab.report.experiment import _caption
from fuselab.train.config import ConfigError
from fuselab.train.run import build_data, build_model

from conftest import tiny_spec

TINY = {**tiny_spec("tiny-tune", variants=[{"name": "lmf-r2", "fusion": {"name": "lmf", "rank": 2}}], lr=5.0e-3),
        "search": {"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}, "fusion.rank": {"int": [2, 8]}}}


def _spec(**changes):
    raw = json.loads(json.dumps(TINY))
    raw.update(changes)
    return parse_spec(raw)


def test_toy_objective_reaches_the_known_optimum_and_prunes_bad_curves():
    space = parse_space({"toy.x": {"uniform": [-5.0, 5.0]}, "opt.lr": {"loguniform": [1.0e-5, 1.0e-1]}})

    def objective(values, report):
        score = -((values["toy.x"] - 2.0) ** 2) - (math.log10(values["opt.lr"]) + 3.0) ** 2  # optimum x=2, lr=1e-3
        for step in range(4):  # a validation curve that ends at the score
            report(step, score - (3 - step))
        return score

    study, clock = optimize(objective, space, trials=60, direction="maximize", seed=0)
    best = study.best_params
    assert abs(best["toy.x"] - 2.0) < 0.5
    assert 10 ** -3.5 < best["opt.lr"] < 10 ** -2.5
    states = [t.state.name for t in study.trials]
    assert len(states) == 60 and states.count("PRUNED") > 0
    assert len(clock.compute) == 60 and clock.wall > 0


def test_space_and_fairness_keys_are_checked():
    with pytest.raises(ConfigError, match="loguniform needs a positive low bound"):
        _spec(search={"train.lr": {"loguniform": [0, 1]}})
    with pytest.raises(ConfigError, match="must be one of"):
        _spec(search={"train.lr": {"normal": [0, 1]}})
    with pytest.raises(ConfigError, match="no method"):
        _spec(search={"fusion.nonsense": {"int": [1, 2]}})
    with pytest.raises(ConfigError, match="budget"):
        _spec(budget="equal-time")
    with pytest.raises(ConfigError, match="no search block"):
        _spec(search=None, budget="equal-trials")
    spec = _spec()
    from fuselab.experiments.tune import method_space

    assert [p.key for p in method_space(spec, "concat")] == ["train.lr"]
    assert [p.key for p in method_space(spec, "lmf-r2")] == ["train.lr", "fusion.rank"]


def test_sealed_split_raises_on_any_use():
    sealed = SealedSplit()
    for use in (lambda: sealed.x, lambda: sealed.y, lambda: len(sealed), lambda: sealed.take(torch.arange(2)),
                lambda: sealed.to("cpu"), lambda: list(sealed.batches(4))):
        with pytest.raises(SealedSplitError):
            use()


class _Tripwire(ModalTensors):
    """A test split that records and refuses every read."""

    reads: list[str] = []

    def __getattribute__(self, name):
        if name in ("x", "y", "take", "to", "batches", "augment"):
            _Tripwire.reads.append(name)
            raise AssertionError(f"a trial read the test split ({name})")
        return object.__getattribute__(self, name)

    def __len__(self):
        _Tripwire.reads.append("len")
        raise AssertionError("a trial read the test split (len)")


def test_no_trial_reads_the_test_split_and_the_best_config_becomes_a_spec(tmp_path):
    spec = _spec(variants=[], search={"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}})
    built = []

    def guarded(cfg):
        data = build_data(cfg)
        tripwire = _Tripwire(data.test.x, data.test.y)
        built.append(tripwire)
        import dataclasses

        return dataclasses.replace(data, test=tripwire)

    _Tripwire.reads = []
    results = tune_spec(spec, trials=2, store=tmp_path, methods=["concat"], build_data=guarded)
    assert built and _Tripwire.reads == []
    best = results["concat"]
    assert best.trials == 2 and 1.0e-3 <= best.params["train.lr"] <= 1.0e-2 and 0 < best.value <= 1
    assert (tmp_path / "tiny-tune" / "tune" / "optuna.sqlite").is_file()
    again = tune_spec(spec, trials=2, store=tmp_path, methods=["concat"], build_data=guarded)  # resumed: no new trial
    assert again["concat"].trials == 2 and again["concat"].clock.compute == []
    path = write_tuned_spec(spec, results, tmp_path / "tuned.yaml")
    tuned = parse_spec(yaml.safe_load(path.read_text()))
    assert tuned.name == "tiny-tune-tuned" and [m.name for m in tuned.methods] == ["concat"]
    assert tuned.plan()[0].config.train.lr == pytest.approx(best.params["train.lr"])


def test_match_params_lands_within_five_percent():
    spec = _spec(grid={"fusion.name": ["concat", "sum", "tfn"]}, match_params=True, search=None)
    plan = spec.plan()
    data = build_data(plan[0].config)
    counts = {}
    for run in plan:
        model = build_model(run.config, data)
        counts[run.method] = sum(p.numel() for p in model.parameters())
    target = counts["concat"]
    assert plan[0].config.model.hidden == 32  # the baseline keeps its width
    for method, count in counts.items():
        assert abs(count / target - 1) <= TOLERANCE, (method, count, target)
    assert {r.method: r.config.model.hidden for r in plan}["tfn"] < 32  # the product fusion got narrower
    caption = _caption("x", spec.source, [0])
    assert "parameters matched to the baseline's within 5 %" in caption and "equal epochs (3)" in caption


def test_equal_trials_tunes_each_method_before_its_seeds(tmp_path):
    spec = _spec(variants=[], grid={"fusion.name": ["concat", "sum"]}, budget="equal-trials", trials=2,
                 search={"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}}, **{"base": {**TINY["base"], "train": {
                     "epochs": 2, "batch_size": 64, "lr": 5.0e-3}}})
    store = Store(tmp_path / "store")
    plan = prepare(spec, store)
    assert set(spec.tuned) == {"concat", "sum"}
    for run in plan:
        assert run.config.train.lr == pytest.approx(spec.tuned[run.method]["train.lr"])
    assert "each method tuned with 2 Optuna trials on validation" in _caption("x", spec.source, [0])
