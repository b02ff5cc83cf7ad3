"""Profile figures of every operator of the default comparison (``mfeat-compare``) in one table.

Per method: parameters, FLOPs per sample (SDPA attention counted), median inference latency at batch 1 and
64 (eval mode, no gradients, after warm-up) and peak memory (CUDA max allocated on a GPU, peak RSS growth on
the CPU), as ``fuselab profile mfeat-compare`` computes them, printed as a Markdown table.

    PYTHONPATH=src python benchmarks/bench_profile.py [--device auto] [--threads 1] [--repeat 50] [--warmup 10]
"""

from __future__ import annotations

import argparse
import platform

import torch

from fuselab.experiments.profile import profile_spec, to_markdown
from fuselab.experiments.spec import load_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default="mfeat-compare")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    spec = load_spec(args.spec)
    frame = profile_spec(spec, device=args.device, threads=args.threads, repeat=args.repeat, warmup=args.warmup)
    where = torch.cuda.get_device_name(0) if frame.attrs["device"].startswith("cuda") else platform.processor() or "CPU"
    print(to_markdown(frame, f"{spec.name} on {frame.attrs['device']} ({where}), {frame.attrs['threads']} torch "
                             f"thread(s); latency: median of {args.repeat} after {args.warmup} warm-up"))


if __name__ == "__main__":
    main()
