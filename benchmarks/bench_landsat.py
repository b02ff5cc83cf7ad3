"""Landsat change detection (Taizhou): pooled Kappa over the fixed spatial folds, per method, mean over seeds.

Reads a store written by ``fuselab compare landsat-cd-compare`` (or runs it first with ``--run``). Every run of
that spec trains one model per fold and stores the test predictions of all folds pooled (every labelled pixel
once, ``predictions.npz``); this script recomputes overall accuracy, Kappa and F1 / IoU of the change class
from those stored predictions (a check on the run's own metrics), then reports per method the mean and
standard deviation over seeds, the every-stage vs single-stage pairs, and the wall time per run.

    FUSELAB_DATA=../shared/data python benchmarks/bench_landsat.py --store /tmp/cd-store [--run --jobs 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fuselab.experiments.results import load_results
from fuselab.metrics import prediction_metrics


def pooled(path: str) -> dict[str, float]:
    with np.load(Path(path) / "predictions.npz") as p:
        pred, true = torch.from_numpy(p["y_pred"]), torch.from_numpy(p["y_true"])
    out = {k: float(v) for k, v in prediction_metrics("change-detection", pred, true, 2).items()}
    out["pixels"] = int(true.numel())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default="/tmp/cd-store")
    parser.add_argument("--experiment", default="landsat-cd-compare")
    parser.add_argument("--run", action="store_true", help="run `fuselab compare` on the store first")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    if args.run:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fuselab.cli", "compare", args.experiment, "--store", args.store,
                        "--jobs", str(args.jobs)], check=True)
        print(f"compare wall time: {time.perf_counter() - start:.0f} s")
    frame = load_results(args.store, args.experiment)
    done = frame[frame["status"] == "done"]
    rows = []
    for _, run in done.iterrows():
        metrics = pooled(run["path"])
        if abs(metrics["kappa"] - run["test_kappa"]) > 1e-5:
            raise SystemExit(f"{run['method']} seed {run['seed']}: stored kappa {run['test_kappa']} != recomputed {metrics['kappa']}")
        rows.append({"method": run["method"], "seed": run["seed"], **metrics, "seconds": run["seconds"]})
    table = pd.DataFrame(rows)
    order = list(dict.fromkeys(done["method"]))
    summary = table.groupby("method").agg(
        seeds=("seed", "count"), kappa=("kappa", "mean"), kappa_std=("kappa", "std"), oa=("accuracy", "mean"),
        f1_change=("f1_change", "mean"), iou_change=("iou_change", "mean"), pixels=("pixels", "first"),
        seconds=("seconds", "mean"),
    ).reindex([m for m in order if m in set(table["method"])])
    summary = summary.sort_values("kappa", ascending=False)
    pd.set_option("display.width", 160)
    print(f"pooled over the folds (every labelled pixel once), mean over seeds; store {args.store}")
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    for single in [m for m in summary.index if m.endswith("-single")]:
        every = single[: -len("-single")]
        if every in summary.index:
            d = summary.at[every, "kappa"] - summary.at[single, "kappa"]
            print(f"every-stage vs single-stage, {every}: {summary.at[every, 'kappa']:.4f} vs "
                  f"{summary.at[single, 'kappa']:.4f} (difference {d:+.4f})")


if __name__ == "__main__":
    main()
