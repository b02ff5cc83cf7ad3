"""fuselab's MultiHeadAttention (on F.scaled_dot_product_attention) vs torch.nn.MultiheadAttention.

Same weights, same inputs, forward + backward, interleaved repetitions, median time per call.

    python benchmarks/bench_attention.py [--threads 1] [--reps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from fuselab.layers import MultiHeadAttention

SHAPES = [(8, 64, 128, 4), (8, 256, 256, 8), (4, 1024, 256, 8)]  # batch, tokens, width, heads


def timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), forward + backward, median of {args.reps} interleaved reps")
    print("| batch x tokens x width, heads | nn.MultiheadAttention ms | fuselab ms | fuselab / torch |")
    print("|---|---:|---:|---:|")
    for b, n, d, h in SHAPES:
        ref = nn.MultiheadAttention(d, h, batch_first=True)
        ours = MultiHeadAttention.from_torch(ref)
        x = torch.randn(b, n, d, requires_grad=True)
        torch_fn = lambda t: ref(t, t, t, need_weights=False)[0]  # noqa: E731
        for _ in range(3):
            timed(torch_fn, x), timed(ours, x)
        t_ref, t_ours = [], []
        for rep in range(args.reps):
            pair = [(t_ref, torch_fn), (t_ours, ours)]
            for store, fn in (pair if rep % 2 == 0 else pair[::-1]):
                store.append(timed(fn, x))
        m_ref, m_ours = statistics.median(t_ref), statistics.median(t_ours)
        print(f"| {b} x {n} x {d}, {h} | {m_ref * 1e3:.2f} | {m_ours * 1e3:.2f} | {m_ours / m_ref:.2f} |")


if __name__ == "__main__":
    main()
