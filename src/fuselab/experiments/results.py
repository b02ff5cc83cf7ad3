"""Reading results back from a store, for reports and notebooks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fuselab.experiments.store import Store


def load_results(store: str | Path, experiment: str) -> pd.DataFrame:
    """One row per planned run of ``experiment``: method, seed, status, metrics, parameters, time, error.

    ``store`` is the store folder (``./runs`` by default in the CLI).
    """
    st = Store(store)
    st.experiment(experiment)  # a clear error for a missing store or experiment
    rows = []
    for run in st.experiment_runs(experiment):
        row = {"run_id": run["run_id"], "method": run["method"], "seed": run["seed"], "status": run["status"]}
        row.update(run["metrics"] or {})
        row["error"] = (run["error"] or "").splitlines()[0] if run["error"] else None
        row["path"] = str(st.run_dir(run["run_id"]))
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_frame(store: str | Path, experiment: str) -> pd.DataFrame:
    """Finished runs with what ``report.tables.summarize`` needs, including per-sample correctness on test."""
    frame = load_results(store, experiment)
    if frame.empty:
        return frame
    done = frame[frame["status"] == "done"].copy()
    correct = []
    for path in done["path"]:
        with np.load(Path(path) / "predictions.npz") as pred:
            correct.append(pred["y_pred"] == pred["y_true"])
    done["correct"] = correct
    return done.rename(columns={"test_accuracy": "accuracy", "test_macro_f1": "macro_f1"})
