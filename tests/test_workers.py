"""Sweep workers live across runs and change nothing a run computes."""

from __future__ import annotations

import json

from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import parse_spec
from fuselab.experiments.store import Store

RAW = {
    "name": "workers",
    "base": {"data": {"name": "mfeat", "views": ["fou", "kar"]}, "model": {"name": "mlp-streams", "hidden": 16},
             "train": {"epochs": 2, "batch_size": 128}},
    "grid": {"fusion.name": ["concat", "sum", "max"]},
    "seeds": [0],
}


def _sweep(root, runs_per_worker):
    store = Store(root)
    plan = prepare(parse_spec(RAW), store)
    outcomes = execute_plan(plan, store, jobs=2, runs_per_worker=runs_per_worker)
    assert [o.status for o in outcomes] == ["done"] * 3
    pids = {o.run_id: json.loads((store.run_dir(o.run_id) / "attempts.json").read_text())[0]["pid"] for o in outcomes}
    metrics = {o.run_id: json.loads((store.run_dir(o.run_id) / "metrics.json").read_text()) for o in outcomes}
    return pids, metrics


def test_two_workers_train_three_runs_with_the_results_of_fresh_processes(tmp_path):
    pids, metrics = _sweep(tmp_path / "reused", None)
    assert len(set(pids.values())) == 2  # three runs, two worker processes: one trained two runs
    fresh_pids, fresh = _sweep(tmp_path / "fresh", 1)
    assert len(set(fresh_pids.values())) == 3  # a process per run
    assert set(metrics) == set(fresh)
    for run_id in metrics:  # a reused worker computes exactly what a fresh process computes
        for key in ("test_accuracy", "test_macro_f1", "val_accuracy", "best_epoch", "params", "flops"):
            assert metrics[run_id][key] == fresh[run_id][key], (run_id, key)


def test_a_pool_started_before_planning_trains_the_sweep_and_its_workers_exit_cleanly(tmp_path):
    from fuselab.experiments.runner import WorkerPool

    with WorkerPool(2) as pool:  # started before the plan exists, as `fuselab compare --jobs 2` does
        workers = list(pool.workers)
        store = Store(tmp_path / "pooled")
        plan = prepare(parse_spec(RAW), store)
        outcomes = execute_plan(plan, store, jobs=2, pool=pool)
        assert pool.workers == []  # handed to the sweep, which stopped them
    assert [o.status for o in outcomes] == ["done"] * 3
    pids = {json.loads((store.run_dir(o.run_id) / "attempts.json").read_text())[0]["pid"] for o in outcomes}
    assert pids == {w.process.pid for w in workers}  # the pre-started workers trained every run
    assert [w.process.exitcode for w in workers] == [0, 0]  # told to stop, they exit with 0
    _, fresh = _sweep(tmp_path / "fresh", 1)
    for o in outcomes:
        assert json.loads((store.run_dir(o.run_id) / "metrics.json").read_text())["test_accuracy"] == \
            fresh[o.run_id]["test_accuracy"]


def test_a_pool_the_sweep_did_not_need_is_stopped_on_close(tmp_path):
    from fuselab.experiments.runner import WorkerPool

    store = Store(tmp_path / "one")
    plan = prepare(parse_spec({**RAW, "grid": {"fusion.name": ["concat"]}}), store)
    with WorkerPool(2) as pool:
        workers = list(pool.workers)
        outcomes = execute_plan(plan, store, jobs=2, pool=pool)  # one run: trained in this process
        assert len(pool.workers) == 2  # not used
    assert [o.status for o in outcomes] == ["done"]
    assert all(not w.process.is_alive() for w in workers)


def test_a_sweep_in_this_process_gives_the_callers_torch_thread_count_back(tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store = Store(tmp_path / "inline")
        plan = prepare(parse_spec({**RAW, "grid": {"fusion.name": ["concat"]}}), store)
        assert [o.status for o in execute_plan(plan, store, jobs=1)] == ["done"]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
