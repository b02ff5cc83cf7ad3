"""Executors side by side on one spec: local --jobs 1, local --jobs 2, and Ray (its start-up included).

Each executor trains the same runs into a fresh store; the figures are wall times of the whole
`fuselab compare` command and the two ratios the targets are about, then where the time went: the sum of
the runs' own times (``seconds`` in each run's metrics: training, evaluation and diagnostics) divided by
the jobs, and the rest of the wall time (command start-up, worker start-up, planning, report). The speed-up
of the runs alone bounds the whole command's: with two cores, a run that already gains from its second
torch thread gains correspondingly less from a second job.

    python benchmarks/bench_executors.py [--methods concat,sum,lmf,late] [--seeds 0,1] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fuselab.experiments.spec import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="mfeat-compare")
    parser.add_argument("--methods", default="concat,sum,lmf,late")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    spec = json.loads(json.dumps(load_spec(args.spec).source))
    methods = args.methods.split(",")
    spec.update(name="bench-executors", grid={"fusion.name": methods}, variants=[],
                seeds=[int(s) for s in args.seeds.split(",")], baseline={"fusion.name": methods[0]})
    spec.pop("search", None)
    executors = [("local-1", ["--jobs", "1"]), ("local-2", ["--jobs", "2"])]
    if not args.skip_ray:
        executors.append(("ray-2", ["--jobs", "2", "--backend", "ray"]))
    times, run_seconds, jobs_of = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        for name, extra in executors:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fuselab.cli", "compare", str(path), "--store", str(Path(tmp) / name),
                            *extra], check=True, capture_output=True)
            times[name] = time.perf_counter() - start
            run_seconds[name] = sum(json.loads(f.read_text())["seconds"]
                                    for f in (Path(tmp) / name / "runs").glob("*/metrics.json"))
            jobs_of[name] = int(extra[1])
    runs = len(methods) * len(spec["seeds"])
    print(f"{runs} runs of {args.spec} ({args.methods}; seeds {args.seeds}); wall time of `fuselab compare`, start-up included")
    for name, seconds in times.items():
        share = run_seconds[name] / jobs_of[name]
        print(f"  {name:8s} {seconds:7.1f} s   runs' own time {run_seconds[name]:6.1f} s / {jobs_of[name]} jobs = "
              f"{share:5.1f} s, the rest {seconds - share:4.1f} s")
    print(f"speed-up --jobs 2 / --jobs 1: {times['local-1'] / times['local-2']:.2f}x "
          f"(runs alone: {run_seconds['local-1'] / (run_seconds['local-2'] / 2):.2f}x)")
    if "ray-2" in times:
        print(f"Ray / local (--jobs 2):        {times['ray-2'] / times['local-2']:.2f}")


if __name__ == "__main__":
    main()
