"""Loop overhead: fuselab's Fabric loop vs a bare PyTorch loop doing the same work.

Same model (mlp-streams + concat on the six mfeat views), same in-memory tensors, same batch order,
same optimiser (fused AdamW), schedule and clipping; each epoch is forward + backward + step over the
training split plus one validation pass. The two loops run interleaved, ``--reps`` times each, and the
figure is the ratio of the median time per epoch.

    python benchmarks/bench_loop_overhead.py [--reps 7] [--epochs 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from fuselab.losses import WeightedLoss
from fuselab.train.config import TrainConfig, make_config
from fuselab.train.loop import fit, make_fabric, warmup_cosine
from fuselab.train.run import build_data, build_model


def bare_epochs(model, data, cfg: TrainConfig, seed: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    steps = math.ceil(len(data.train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.epochs * steps, cfg.warmup))
    gen = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        model.train()
        for x, y in data.train.batches(cfg.batch_size, generator=gen, shuffle=True):
            loss = F.cross_entropy(model(x).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(x).logits for x, _ in data.val.batches(cfg.eval_batch_size)])
            (logits.argmax(1) == data.val.y).float().mean().item()
        times.append(time.perf_counter() - start)
    return times


def fuselab_epochs(model, data, cfg: TrainConfig, seed: int) -> list[float]:
    stamps = [time.perf_counter()]
    fit(model, data, WeightedLoss([{"name": "ce"}]), cfg, seed=seed, fabric=make_fabric(cfg),
        on_epoch=lambda e, row: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = make_config(None, [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.accelerator=cpu"])
    tcfg = TrainConfig(**{k: v for k, v in cfg.train.items()})
    data = build_data(cfg)
    ours, bare = [], []
    for rep in range(args.reps):
        for kind in (("ours", "bare") if rep % 2 == 0 else ("bare", "ours")):
            torch.manual_seed(0)
            model = build_model(cfg, data)
            epochs = fuselab_epochs(model, data, tcfg, 0) if kind == "ours" else bare_epochs(model, data, tcfg, 0)
            (ours if kind == "ours" else bare).extend(epochs[1:])  # the first epoch warms caches
    m_ours, m_bare = statistics.median(ours), statistics.median(bare)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, "
          f"{len(data.train)} training samples, {args.reps} interleaved reps x {args.epochs - 1} timed epochs")
    print(f"fuselab loop  median {m_ours * 1000:8.1f} ms/epoch")
    print(f"bare PyTorch  median {m_bare * 1000:8.1f} ms/epoch")
    print(f"ratio fuselab / bare: {m_ours / m_bare:.3f}")


if __name__ == "__main__":
    main()
