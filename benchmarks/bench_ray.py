"""Ray backend vs local processes: wall time of the same spec, Ray's start-up included.

    python benchmarks/bench_ray.py [--methods concat,sum,lmf,late] [--seeds 0,1] [--jobs 2]
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
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    spec = json.loads(json.dumps(load_spec(args.spec).source))
    spec.update(name="bench-ray", grid={"fusion.name": args.methods.split(",")}, variants=[],
                seeds=[int(s) for s in args.seeds.split(",")], baseline={"fusion.name": args.methods.split(",")[0]})
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        for backend in ("local", "ray"):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fuselab.cli", "compare", str(path), "--store", str(Path(tmp) / backend),
                            "--jobs", str(args.jobs), "--backend", backend], check=True, capture_output=True)
            times[backend] = time.perf_counter() - start
    runs = len(spec["grid"]["fusion.name"]) * len(spec["seeds"])
    print(f"{runs} runs ({args.methods}; seeds {args.seeds}), --jobs {args.jobs}, wall time including start-up")
    print(f"local: {times['local']:.1f} s   ray: {times['ray']:.1f} s   ray / local: {times['ray'] / times['local']:.2f}")


if __name__ == "__main__":
    main()
