"""Parallel speed-up of `fuselab compare`: --jobs 2 vs --jobs 1 on the same spec, each into a fresh store.

    python benchmarks/bench_jobs.py [--spec mfeat-compare] [--methods concat,sum,lmf,late] [--seeds 0,1]
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
    args = parser.parse_args()
    spec = load_spec(args.spec).source
    spec = json.loads(json.dumps(spec))
    spec["name"] = "bench-jobs"
    spec["grid"] = {"fusion.name": args.methods.split(",")}
    spec["variants"] = []
    spec["seeds"] = [int(s) for s in args.seeds.split(",")]
    spec["baseline"] = {"fusion.name": args.methods.split(",")[0]}
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        for jobs in (1, 2):
            store = Path(tmp) / f"store{jobs}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fuselab.cli", "compare", str(path), "--store", str(store),
                            "--jobs", str(jobs)], check=True, capture_output=True)
            times[jobs] = time.perf_counter() - start
    runs = len(spec["grid"]["fusion.name"]) * len(spec["seeds"])
    print(f"{runs} runs of {args.spec} ({args.methods}; seeds {args.seeds}), wall time including start-up")
    print(f"--jobs 1: {times[1]:.1f} s   --jobs 2: {times[2]:.1f} s   speed-up {times[1] / times[2]:.2f}x")


if __name__ == "__main__":
    main()
