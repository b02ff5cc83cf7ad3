"""Shared-weight conv streams: one batched pass over the stacked modalities vs a Python loop over them.

The same ``conv-streams`` model (shared weights, fused at every stage, FPN neck, dense head) is built twice
from one seed; in the looped copy every shared stage runs once per modality (``LoopedStage``) instead of once
on the modalities stacked on the batch axis (``SharedStage``). Both train on the same Taizhou windows
(forward, dense loss, backward, AdamW step); the steps are interleaved, ``--reps`` rounds of ``--steps``
steps each, and the figure is the median time per training step.

    FUSELAB_DATA=../shared/data python benchmarks/bench_shared_weights.py [--reps 7] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from fuselab.data.landsat import landsat_cd
from fuselab.losses import WeightedLoss
from fuselab.models.conv import LoopedStage, SharedStage, conv_streams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = landsat_cd(fold=0)
    x, y = data.train.take(torch.arange(args.batch))
    torch.manual_seed(0)
    batched = conv_streams(dims=data.dims, num_classes=2, fusion={"name": "concat"}, widths=args.widths,
                           shared_weights=True, fuse_at="all", neck="fpn", dense=True)
    looped = copy.deepcopy(batched)
    for i, step in enumerate(looped.merge.steps):
        assert isinstance(step, SharedStage)
        looped.merge.steps[i] = LoopedStage(step.module)
    loss = WeightedLoss([{"name": "dense-ce"}])
    models = {"batched": batched, "looped": looped}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}

    def steps(name: str) -> float:
        model, opt = models[name], optimizers[name]
        model.train()
        start = time.perf_counter()
        for _ in range(args.steps):
            total, _ = loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        return (time.perf_counter() - start) / args.steps

    for name in models:  # warm-up
        steps(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.reps):
        for name in models:
            times[name].append(steps(name))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"conv-streams widths {args.widths}, 2 modalities, batch {args.batch} windows of 32 x 32, "
          f"{args.threads} thread(s), median of {args.reps} x {args.steps} steps")
    for name, value in med.items():
        print(f"  {name:8s} {value * 1000:8.1f} ms / training step")
    print(f"  looped / batched = {med['looped'] / med['batched']:.2f}")


if __name__ == "__main__":
    main()
