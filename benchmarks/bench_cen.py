"""CEN figures: the step-time cost of channel exchanging, and how many channels are exchanged as training goes.

1. Step time (forward, dense loss with the unimodal and sparsity terms, backward, AdamW step) of the
   shared-weight ``cen`` network with exchange / the same network without exchange (private BNs only),
   interleaved repetitions, medians, one thread, 32 x 32 windows of 6 bands, two dates. Target <= 1.05.
2. With ``--store`` (after ``fuselab compare cen-official --store STORE``, or ``cen-ablation``): per method,
   the share of exchanged channels of each stage at every epoch, averaged over the folds, the modalities and
   the seeds, from the runs' history.csv; then per method and seed the final share of each stage's *owned*
   channels that are exchanged (the part of its channels each modality's L1 term targets), the minimum over
   the folds and the modalities, so ">= 0.3 in every stage" can be read off directly.

    python benchmarks/bench_cen.py --reps 9 --steps 5
    FUSELAB_DATA=../shared/data python benchmarks/bench_cen.py --store /tmp/censtore --experiment cen-official
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from fuselab.losses import WeightedLoss
from fuselab.models.cen import cen

TERMS = [{"name": "dense-ce"}, {"name": "aux-unimodal"}, {"name": "cen-sparsity", "weight": 2e-2}]


def step_time(model: torch.nn.Module, batch: dict[str, torch.Tensor], y: torch.Tensor, steps: int) -> float:
    """Seconds per training step (median of ``steps``)."""
    loss = WeightedLoss(TERMS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        total, _ = loss(model(batch), y)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_step(batch_size: int, reps: int, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    dims = {"t1": 6, "t2": 6}
    models = {flag: cen(dims=dims, num_classes=2, widths=[16, 32, 64], dense=True, exchanging=flag) for flag in (True, False)}
    # a threshold that exchanges half of the channels, as after sparsity training, so the exchange is not idle
    with torch.no_grad():
        for m in models[True].modules():
            if hasattr(m, "parts"):
                for name, (lo, hi) in m.parts.items():
                    m.norms[name].weight[lo:hi] = 0.0
    batch = {m: torch.randn(batch_size, 6, 32, 32) for m in dims}
    y = torch.randint(0, 2, (batch_size, 32, 32))
    for model in models.values():  # warm-up
        step_time(model, batch, y, 2)
    results: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(reps):  # interleaved: both see the same machine load
        for flag, model in models.items():
            results[flag].append(step_time(model, batch, y, steps))
    return statistics.median(results[True]), statistics.median(results[False])


def _histories(store: Path, experiment: str):
    """(method, seed, history) of every finished run of ``experiment`` (one history row per fold and epoch)."""
    from fuselab.experiments.results import load_results

    frame = load_results(store, experiment)
    for _, run in frame[frame["status"] == "done"].iterrows():
        yield run["method"], int(run["seed"]), pd.read_csv(Path(store) / "runs" / run["run_id"] / "history.csv")


def _stage(column: str) -> str:
    return "stage " + re.search(r"stages\.(\d+)", column).group(1)


def exchanged_table(store: Path, experiment: str) -> pd.DataFrame:
    """Rows: method x epoch; columns: stage -> share of exchanged channels (mean over folds, modalities, seeds)."""
    rows = []
    for method, _, history in _histories(store, experiment):
        cols = [c for c in history.columns if "exchanged/" in c]
        if not cols:  # a run without exchange (the no-exchange twin)
            continue
        for epoch, group in history.groupby("epoch"):
            row: dict = {"method": method, "epoch": int(epoch)}
            for c in cols:
                row.setdefault(_stage(c), []).append(float(group[c].mean()))
            rows.append({k: (sum(v) / len(v) if isinstance(v, list) else v) for k, v in row.items()})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.groupby(["method", "epoch"], sort=False).mean().reset_index()


def final_owned_table(store: Path, experiment: str) -> pd.DataFrame:
    """Rows: method x seed; columns: stage -> share of the owned channels exchanged at the last epoch, the
    minimum over the folds and the modalities (``exchanged_owned/<modality>`` in history.csv)."""
    rows = []
    for method, seed, history in _histories(store, experiment):
        cols = [c for c in history.columns if "exchanged_owned/" in c]
        if not cols:
            continue
        last = history[history["epoch"] == history["epoch"].max()]
        row: dict = {"method": method, "seed": seed}
        for c in cols:
            row[_stage(c)] = min(row.get(_stage(c), 1.0), float(last[c].min()))
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--experiment", default="cen-official")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.store is None:
        print("batch | with exchange | without | ratio (target <= 1.05)")
        for b in args.batch:
            with_ex, without = bench_step(b, args.reps, args.steps)
            print(f"{b:5d} | {with_ex * 1e3:10.1f} ms | {without * 1e3:7.1f} ms | {with_ex / without:.3f}")
        return
    table = exchanged_table(args.store, args.experiment)
    if table.empty:
        print(f"no cen runs with exchange statistics in {args.store} ({args.experiment})")
        return
    for method, group in table.groupby("method", sort=False):
        print(f"\n{method}: share of channels exchanged (mean over folds, modalities and seeds)")
        print(group.drop(columns="method").set_index("epoch").round(3).to_string())
    owned = final_owned_table(args.store, args.experiment)
    if not owned.empty:
        print("\nfinal share of the owned channels exchanged (minimum over folds and modalities)")
        print(owned.set_index(["method", "seed"]).round(3).to_string())


if __name__ == "__main__":
    main()
