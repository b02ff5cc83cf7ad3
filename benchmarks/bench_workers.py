"""Per-run fixed cost of a sweep: a fresh worker process per run against workers that live across runs.

Both sweeps train the same tiny runs (mfeat, two views, one epoch: training itself takes a fraction of a
second) with ``--jobs 2`` into fresh stores, in this one process, one after the other; what a run costs
beyond its training is then the sweep's wall time divided by the runs.

    python benchmarks/bench_workers.py [--runs 12] [--jobs 2] [--epochs 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import parse_spec
from fuselab.experiments.store import Store


def sweep(runs: int, jobs: int, epochs: int, runs_per_worker: int | None, root: Path) -> tuple[float, float]:
    """(wall seconds of the sweep, mean training seconds per run) for ``runs`` runs."""
    spec = parse_spec({
        "name": "bench-workers",
        "base": {"data": {"name": "mfeat", "views": ["fou", "kar"]}, "model": {"name": "mlp-streams", "hidden": 32},
                 "train": {"epochs": epochs, "batch_size": 128, "checkpoint_every": 1.0e9}},
        "grid": {"fusion.name": ["concat", "sum", "mean", "max"]},
        "seeds": list(range(-(-runs // 4))),
    })
    store = Store(root)
    plan = prepare(spec, store)[:runs]
    start = time.perf_counter()
    outcomes = execute_plan(plan, store, jobs=jobs, runs_per_worker=runs_per_worker)
    wall = time.perf_counter() - start
    assert all(o.status == "done" for o in outcomes), [(o.status, o.error) for o in outcomes]
    trained = [float(o.metrics["seconds"]) for o in outcomes]
    return wall, sum(trained) / len(trained)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, per_worker in (("fresh process per run", 1), ("workers live across runs", None)):
            results[label] = sweep(args.runs, args.jobs, args.epochs, per_worker, Path(tmp) / label.replace(" ", "-"))
    print(f"{args.runs} runs (mfeat fou+kar, mlp-streams hidden 32, {args.epochs} epoch), --jobs {args.jobs}")
    for label, (wall, train) in results.items():
        per_run = wall * args.jobs / args.runs
        print(f"  {label:26s} sweep {wall:6.1f} s; per run {per_run:5.2f} s of a worker's time "
              f"(training inside it {train:4.2f} s; fixed cost {per_run - train:5.2f} s)")
    fresh, reused = results["fresh process per run"][0], results["workers live across runs"][0]
    print(f"sweep speed-up from reusing workers: {fresh / reused:.2f}x")


if __name__ == "__main__":
    main()
