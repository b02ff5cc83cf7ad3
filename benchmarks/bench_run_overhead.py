"""The whole `fuselab run` process against a plain PyTorch script that trains the same model.

Both train mlp-streams + concat (two stages of width 128 per view, layer norm, dropout 0.2, a linear head)
on the six mfeat views read from the CSVs that ship with fuselab: a stratified 70/10/20 split, features
standardised on the training part, AdamW (lr 1e-3, weight decay 1e-2) with 5 % warm-up and a cosine
schedule, gradient clipping at 1, batch 64, ``--epochs`` epochs with a validation pass after each, the best
validation epoch kept and scored on the test part, ``--threads`` torch threads. The plain script does only
that; `fuselab run` also checks the config, counts FLOPs, records the fusion diagnostics, writes the run
folder (config, history, metrics, predictions, resumable state) and prints its summary. Each is started as
a fresh process ``--reps`` times, interleaved; the figures are medians of the wall time, start-up included,
and of the part outside training (the wall time less the training time each process reports: the plain
script from its optimiser's creation to its test score, `fuselab run` its run's seconds).

    python benchmarks/bench_run_overhead.py [--reps 5] [--epochs 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

PLAIN = '''
import sys, math, copy, time
import numpy as np, pandas as pd, torch
from torch import nn
import torch.nn.functional as F

root, epochs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
views = ["fou", "fac", "kar", "pix", "zer", "mor"]
frames = [pd.read_csv(f"{root}/mfeat-{v}.csv.xz").to_numpy(np.float32) for v in views]
y = torch.from_numpy(frames[0][:, -1].astype(np.int64))
xs = [torch.from_numpy(f[:, :-1]) for f in frames]
rng = np.random.default_rng(0)
parts = {"train": [], "val": [], "test": []}
for c in range(10):
    idx = rng.permutation(np.flatnonzero(y.numpy() == c))
    n_test, n_val = round(0.2 * len(idx)), round(0.1 * len(idx))
    parts["test"] += list(idx[:n_test]); parts["val"] += list(idx[n_test:n_test + n_val])
    parts["train"] += list(idx[n_test + n_val:])
split = {k: torch.tensor(sorted(v)) for k, v in parts.items()}
data = {}
for k, i in split.items():
    data[k] = ([x[i] for x in xs], y[i])
for j in range(len(xs)):
    mean, std = data["train"][0][j].mean(0), data["train"][0][j].std(0).clamp_min(1e-6)
    for k in data:
        data[k][0][j] = (data[k][0][j] - mean) / std

def stream(d):
    return nn.Sequential(nn.Linear(d, 128), nn.LayerNorm(128), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(128, 128), nn.LayerNorm(128), nn.ReLU(), nn.Dropout(0.2))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.streams = nn.ModuleList(stream(x.shape[1]) for x in xs)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(128 * len(xs), 10))
    def forward(self, parts):
        return self.head(torch.cat([s(p) for s, p in zip(self.streams, parts)], 1))

model = Net()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, fused=True)  # as fuselab on a CPU
started = time.perf_counter()
n = len(data["train"][1]); steps = epochs * math.ceil(n / 64); warm = max(1, int(0.05 * steps))
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
best, best_state = -1.0, None
def accuracy(k):
    model.eval()
    with torch.no_grad():
        return (model(data[k][0]).argmax(1) == data[k][1]).float().mean().item()
for epoch in range(epochs):
    model.train()
    order = torch.randperm(n)
    for b in range(0, n, 64):
        i = order[b:b + 64]
        loss = F.cross_entropy(model([x[i] for x in data["train"][0]]), data["train"][1][i])
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    val = accuracy("val")
    if val > best:
        best, best_state = val, copy.deepcopy(model.state_dict())
model.load_state_dict(best_state)
test = accuracy("test")
print(f"test accuracy {test * 100:.2f} %, {time.perf_counter() - started:.1f} s")
'''


def timed(command: list[str]) -> tuple[float, float, str]:
    """Wall time of the process, the training time it reports (the last "N s" of its last line), that line."""
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = done.stdout.strip().splitlines()[-1]
    return wall, float(re.findall(r"([0-9.]+) s$", line)[-1]), line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bundled = Path(str(resources.files("fuselab") / "data" / "mfeat"))
    times: dict[str, list[float]] = {"plain script": [], "fuselab run": []}
    training: dict[str, list[float]] = {"plain script": [], "fuselab run": []}
    last: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "plain.py"
        script.write_text(PLAIN)
        commands = {
            "plain script": [sys.executable, str(script), str(bundled), str(args.epochs), str(args.threads)],
            "fuselab run": [sys.executable, "-m", "fuselab.cli", "run", f"train.epochs={args.epochs}",
                            f"train.threads={args.threads}", "--force", "--out", str(Path(tmp) / "runs")],
        }
        for _ in range(args.reps):  # interleaved: a change in machine load hits both alike
            for name, command in commands.items():
                seconds, trained, last[name] = timed(command)
                times[name].append(seconds)
                training[name].append(trained)
    print(f"mfeat, six views, mlp-streams + concat, {args.epochs} epochs, {args.threads} threads; "
          f"wall time of a fresh process, median of {args.reps}")
    fixed = {}
    for name, values in times.items():
        fixed[name] = statistics.median(w - t for w, t in zip(values, training[name]))
        print(f"  {name:13s} {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f}); "
              f"training {statistics.median(training[name]):5.2f} s, the rest {fixed[name]:5.2f} s")
        print(f"  {'':13s} last: {last[name]}")
    extra = statistics.median(times["fuselab run"]) - statistics.median(times["plain script"])
    print(f"fuselab run - plain script: {extra:+.2f} s (target: at most +1 s); outside training: "
          f"{fixed['fuselab run'] - fixed['plain script']:+.2f} s")


if __name__ == "__main__":
    main()
