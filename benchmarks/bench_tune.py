"""Optuna bookkeeping per trial on mfeat, as a share of the trial's time.

Tunes ``train.lr`` (loguniform 1e-4..1e-2) of one method of the default comparison (``mfeat-compare``,
concat unless ``--method``) with ``--trials`` trials in SQLite storage (the default of ``fuselab tune``), in a
fresh temporary store. A trial's compute is the time inside the objective (data from cache, model build,
training, validation), less the Optuna calls it makes (``trial.report`` / ``should_prune`` per epoch); the
bookkeeping is everything else in ``study.optimize`` (sampling, storage writes, pruner, callbacks). Printed:
wall time, bookkeeping share of it, bookkeeping per trial, median trial compute, pruned trials. The target is
bookkeeping < 2 % of a trial's time.

    PYTHONPATH=src python benchmarks/bench_tune.py [--trials 12] [--epochs 40] [--method concat] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from fuselab.experiments.spec import load_spec
from fuselab.experiments.tune import default_storage, optimize, method_space, study_name, validation_objective
from fuselab.train.loop import NonFiniteLossError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=None, help="default: the spec's")
    parser.add_argument("--method", default="concat")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--storage", default=None, help="Optuna URL (default: SQLite in a temporary store)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = load_spec("mfeat-compare")
    spec.search = {"train.lr": {"loguniform": [1.0e-4, 1.0e-2]}}
    if args.epochs:
        spec.base = {**spec.base, "train": {**spec.base["train"], "epochs": args.epochs}}
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage or default_storage(tmp, spec.name)
        space = method_space(spec, args.method)
        study, clock = optimize(validation_objective(spec, args.method), space, trials=args.trials,
                                direction="maximize", storage=storage, study_name=study_name(spec, args.method, space),
                                catch=(NonFiniteLossError,))
        pruned = sum(t.state.name == "PRUNED" for t in study.trials)
    n = len(clock.compute)
    epochs = spec.base["train"]["epochs"]
    print(f"mfeat-compare/{args.method}: {n} trials x up to {epochs} epochs, {args.threads} torch thread(s), "
          f"storage {'SQLite' if args.storage is None else args.storage.split(':')[0]}")
    print(f"wall {clock.wall:.1f} s; trial compute median {statistics.median(clock.compute):.2f} s "
          f"(pruned {pruned} of {n})")
    print(f"bookkeeping {clock.bookkeeping:.3f} s in all, {clock.bookkeeping / n * 1e3:.1f} ms per trial = "
          f"{clock.bookkeeping_share * 100:.2f} % of the tuning time (target < 2 %)")
    steady = clock.overhead[1:] or clock.overhead  # the first trial also pays one-time imports and setup
    print(f"per trial: bookkeeping median {statistics.median(steady) * 1e3:.1f} ms over trials 2..{n} "
          f"(first trial {clock.overhead[0] * 1e3:.0f} ms) = {statistics.median(steady) / statistics.median(clock.compute) * 100:.2f} % "
          "of the median trial's compute")
    print(f"best val accuracy {study.best_value * 100:.2f} at train.lr={study.best_params['train.lr']:.2e}")


if __name__ == "__main__":
    main()
