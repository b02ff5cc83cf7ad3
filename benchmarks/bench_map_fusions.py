"""Parameters, FLOPs and CPU latency of every feature-map fusion operator.

Legend: b batch, c channels, h height, w width of a map.

Each operator registered with the "map" form is built with its default options for two modalities of
``--channels`` channels and run on ``(batch, channels, size, size)`` maps in eval mode. FLOPs are those
``torch.utils.flop_counter.FlopCounterMode`` counts (matrix products and convolutions, 2 per
multiply-add; element-wise work, pooling and norms count zero). Latency is the median of ``--repeats``
timed forward passes after ``--warmup`` untimed ones, with ``--threads`` intra-op threads.

    PYTHONPATH=src python benchmarks/bench_map_fusions.py [--threads 1] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fuselab import create_fusion, fusion_info, list_fusions


def count_flops(op: nn.Module, xs: dict[str, Tensor]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        op(xs)
    return counter.get_total_flops()


def median_latency_ms(op: nn.Module, xs: dict[str, Tensor], *, warmup: int, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            op(xs)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="height and width of the maps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dims = {"rgb": args.channels, "depth": args.channels}
    xs = {m: torch.randn(args.batch, c, args.size, args.size) for m, c in dims.items()}
    names = [name for name in list_fusions() if "map" in fusion_info(name).forms]

    print(
        f"# map fusions: 2 modalities x (B={args.batch}, C={args.channels}, H=W={args.size}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), eval mode, "
        f"median of {args.repeats} runs"
    )
    header = f"| {'id':<19}| {'contract':<9}| {'out':>5} | {'params':>9} | {'MFLOPs':>9} | {'latency ms':>10} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name in names:
        op = create_fusion(name, dims=dims).eval()
        out = op(xs)
        width = out.shape[1] if isinstance(out, Tensor) else "same"
        params = sum(p.numel() for p in op.parameters())
        mflops = count_flops(op, xs) / 1e6
        latency = median_latency_ms(op, xs, warmup=args.warmup, repeats=args.repeats)
        contract = fusion_info(name).contract
        print(f"| {name:<19}| {contract:<9}| {width!s:>5} | {params:>9,} | {mflops:>9.1f} | {latency:>10.2f} |")


if __name__ == "__main__":
    main()
