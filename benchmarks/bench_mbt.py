"""Token fusion cost on CPU: bottleneck vs joint attention vs late, and MBT training-step throughput.

Legend: b batch, n tokens per modality, d width, l layers.

Part 1. One training step (forward, backward, AdamW step) of two modalities' token streams through ``--layers``
pre-norm blocks of width 256, 8 heads, exchanging from the first layer: ``bottleneck`` (4 tokens),
``joint-attention`` and late (no exchange). Batch sizes keep ``--tokens-per-batch`` tokens per modality at
2 x 64, 2 x 256 and 2 x 1024 tokens. FLOPs are ``torch.utils.flop_counter`` counts of the step with the CPU
SDPA kernel counted (fuselab registers its formula); the analytic ratio counts 24 d^2 per token per layer for
the linear layers and 4 n_q n_k d for attention, forward only (backward scales both alike). Wall time is the
median of ``--repeats`` interleaved repetitions (all variants of a size timed in turn, after one warm-up each).

Part 2. An MBT training step (two modalities, ``--tokens`` tokens each incl. the class token, 8 heads,
``layers`` 2, bottleneck from layer 0 so that it spans both blocks and carries information, late merge) at
widths 128, 256, 512 and a batch that gives about 8k tokens per modality, as achieved FLOP/s over the float32
matmul FLOP/s of the same machine measured in the same run ((8192 x d) @ (d x 4d), the shape of the MLP's first
layer).

    PYTHONPATH=src python benchmarks/bench_mbt.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fuselab import create_fusion
from fuselab.layers import TransformerBlock
from fuselab.models.mbt import mbt


class Streams(nn.Module):
    """Two token streams of ``layers`` blocks, with an exchange over all of them (or none: late)."""

    def __init__(self, exchange: str, *, width: int, heads: int, layers: int) -> None:
        super().__init__()
        blocks = {m: [TransformerBlock(dim=width, heads=heads) for _ in range(layers)] for m in ("a", "b")}
        if exchange == "late":
            self.body = nn.ModuleDict({m: nn.Sequential(*blocks[m]) for m in blocks})
            self.exchange = None
        else:
            self.body = None
            options = {"n_bottlenecks": 4} if exchange == "bottleneck" else {}
            self.exchange = create_fusion(exchange, layers=blocks, **options)

    def forward(self, xs: dict[str, Tensor]) -> Tensor:
        out = self.exchange(xs) if self.exchange is not None else {m: self.body[m](x) for m, x in xs.items()}
        return sum(t.float().pow(2).mean() for t in out.values())


def analytic_forward_flops(exchange: str, n: int, d: int, batch: int, layers: int, z: int = 4) -> float:
    def layer(n_q: int, n_k: int) -> float:
        return 24 * d * d * n_q + 4 * n_q * n_k * d

    per_layer = {
        "late": 2 * layer(n, n),
        "joint-attention": 2 * layer(n, 2 * n),
        "bottleneck": 2 * layer(n + z, n + z),
    }[exchange]
    return batch * layers * per_layer


def step_fn(model: nn.Module, xs: dict[str, Tensor]):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(xs)
        loss = out.logits.float().logsumexp(-1).mean() if hasattr(out, "logits") else out
        loss.backward()
        opt.step()

    return step


def count_flops(step) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def part_one(args) -> None:
    print(f"\n## bottleneck vs joint-attention vs late: width {args.width}, {args.layers} layers, "
          f"{args.tokens_per_batch} tokens per modality per batch, training step, {torch.get_num_threads()} threads")
    print("| tokens | batch | variant | GFLOP/step | FLOPs / joint | analytic / joint | ms/step | time / joint |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (64, 256, 1024):
        batch = max(args.tokens_per_batch // n, 1)
        torch.manual_seed(0)
        xs = {m: torch.randn(batch, n, args.width) for m in ("a", "b")}
        variants = ("bottleneck", "joint-attention", "late")
        steps = {v: step_fn(Streams(v, width=args.width, heads=8, layers=args.layers), xs) for v in variants}
        flops = {v: count_flops(steps[v]) for v in variants}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for v in variants:
            timed(steps[v])  # warm-up
        for _ in range(args.repeats):
            for v in variants:
                times[v].append(timed(steps[v]))
        med = {v: statistics.median(times[v]) * 1e3 for v in variants}
        ana = {v: analytic_forward_flops(v, n, args.width, batch, args.layers) for v in variants}
        for v in variants:
            print(f"| 2 x {n} | {batch} | {v} | {flops[v] / 1e9:.2f} | {flops[v] / flops['joint-attention']:.3f} | "
                  f"{ana[v] / ana['joint-attention']:.3f} | {med[v]:.1f} | {med[v] / med['joint-attention']:.3f} |")


def matmul_flops_per_s(d: int, repeats: int) -> float:
    a, b = torch.randn(8192, d), torch.randn(d, 4 * d)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 8192 * d * 4 * d / statistics.median(times)


def part_two(args) -> None:
    print(f"\n## MBT training step vs float32 matmul: 2 modalities x {args.tokens} tokens, 8 heads, 2 layers, "
          f"bottleneck from layer 0, {torch.get_num_threads()} threads")
    print("| width | batch | tokens/modality/batch | GFLOP/step | ms/step | step GFLOP/s | matmul GFLOP/s | fraction |")
    print("|---|---|---|---|---|---|---|---|")
    features = args.tokens - 1  # one feature per token, plus the class token
    for width in (128, 256, 512):
        batch = max(8192 // args.tokens, 1)
        torch.manual_seed(0)
        model = mbt(dims={"a": features, "b": features}, num_classes=10, fusion={"name": "late"}, layers=2,
                    width=width, heads=8, fusion_layer=0)
        xs = {m: torch.randn(batch, features) for m in ("a", "b")}
        step = step_fn(model, xs)
        flops = count_flops(step)
        step_times, mm = [], []
        for i in range(args.repeats + 1):  # interleave the model step and the matmul reference
            t = timed(step)
            if i:
                step_times.append(t)
            mm.append(matmul_flops_per_s(width, 3))
        ms = statistics.median(step_times)
        achieved, peak = flops / ms, statistics.median(mm)
        print(f"| {width} | {batch} | {batch * args.tokens} | {flops / 1e9:.1f} | {ms * 1e3:.0f} | {achieved / 1e9:.1f} | "
              f"{peak / 1e9:.1f} | {achieved / peak:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens-per-batch", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per modality in part 2")
    parser.add_argument("--part", choices=["1", "2", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("1", "both"):
        part_one(args)
    if args.part in ("2", "both"):
        part_two(args)


if __name__ == "__main__":
    main()
