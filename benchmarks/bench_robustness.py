"""The robustness table of an experiment in a store: clean accuracy, relative and effective robustness.

Evaluates the runs whose curves are missing or out of date (``fuselab robustness``), reads the others back,
prints the summary table, then per corruption the relative robustness per corrupted modality, and the time
taken.

    python benchmarks/bench_robustness.py mfeat-compare --store /tmp/rob-store [--noise-scale 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from fuselab.experiments.robustness import RobustnessSettings, modality_markdown, run_robustness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default="mfeat-compare")
    parser.add_argument("--store", default="runs")
    parser.add_argument("--noise-scale", type=float, default=1.0)
    parser.add_argument("--missing", default="auto", choices=["auto", "zeros"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="evaluate every run again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run_robustness(args.store, args.experiment,
                            RobustnessSettings(noise_scale=args.noise_scale, missing=args.missing), force=args.force)
    seconds = time.perf_counter() - start
    print(result.markdown)
    order = list(result.table["method"])
    for corruption in result.table.attrs["corruptions"]:
        print(f"\n{corruption}: relative robustness (%) per corrupted modality\n")
        print(modality_markdown(result.areas, corruption, order=order))
    for error in result.errors:
        print(f"not evaluated: {error['method']} (seed {error['seed']}): {error['error']}")
    print(f"\n{result.evaluated} runs evaluated, {result.cached} read back, {seconds:.1f} s "
          f"({torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
