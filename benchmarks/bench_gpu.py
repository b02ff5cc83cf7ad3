"""The GPU path, measured in one prepared run: the default comparison, an MBT run on AV-MNIST and a Landsat run.

Rows (each trained through ``fuselab.train.loop.fit``, the loop every command uses, on ``--device`` in
``--precision``):

- ``mfeat-compare``: the default comparison, every method at seed 0 (the spec's 40 epochs);
- ``mbt avmnist``: the ``bottleneck/clean`` method of ``avmnist-compare`` (MBT, bottleneck tokens), seed 0;
- ``landsat``: the ``concat`` method of ``landsat-cd-compare`` (conv streams, every fold), seed 0;
- ``matmul peak``: a large square matmul in the autocast dtype of ``--precision`` (bfloat16 for bf16-mixed),
  the FLOP/s that MBT's rate is compared with.

Per row: seconds per optimiser step (median over epochs after each fold's first, the epoch's validation
included: an upper bound of the step), the first epoch's seconds (start-up and, with ``--compile``, the
compilation), the mean GPU utilisation sampled every 0.2 s while the row trained (``torch.cuda.utilization``,
which needs pynvml; the column says why it is empty otherwise) and the test accuracy. MBT's FLOP/s are its
counted FLOPs per epoch (``torch.utils.flop_counter``: one training step's forward and backward times the
steps, plus the validation forwards) over the median epoch time, so they are a lower bound of the rate.

    PYTHONPATH=src python benchmarks/bench_gpu.py                      # a CUDA machine: the figures
    PYTHONPATH=src python benchmarks/bench_gpu.py --channels-last --compile
    PYTHONPATH=src python benchmarks/bench_gpu.py --dry-run            # CPU, tiny sizes: the same table, no figures

``--dry-run`` runs on the CPU with 1 epoch, two mfeat methods, 128 AV-MNIST training pairs and one Landsat
fold with narrow streams: it checks that the script and the precision path work, its numbers mean nothing.
Needs the real data under ``FUSELAB_DATA``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
import time
from typing import Any

import torch
from omegaconf import OmegaConf

from fuselab.experiments.spec import load_spec
from fuselab.train.config import make_config
from fuselab.train.loop import autocast, fit
from fuselab.train.session import prepare_run

COLUMNS = ("row", "runs", "device", "precision", "s/step", "first epoch s", "GPU util %", "test accuracy", "TFLOP/s",
           "of matmul peak")


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of ``(size x size) @ (size x size)`` in ``dtype`` on ``device`` (median of ``repeats``, after a
    warm-up): the machine's practical matmul peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Utilisation:
    """Mean GPU utilisation (percent) over a ``with`` block, sampled by a thread every ``interval`` seconds;
    ``mean`` is a reason string where it cannot be measured."""

    def __init__(self, device: torch.device, interval: float = 0.2) -> None:
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self.reason = self._unavailable()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _unavailable(self) -> str | None:
        if self.device.type != "cuda":
            return "n/a (no CUDA device)"
        try:
            torch.cuda.utilization(self.device)
        except Exception as exc:  # noqa: BLE001 - pynvml missing or the driver does not report it
            return f"n/a ({type(exc).__name__}: pynvml?)"
        return None

    def __enter__(self) -> "Utilisation":
        if self.reason is None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(float(torch.cuda.utilization(self.device)))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> str:
        if self.reason is not None:
            return self.reason
        return f"{statistics.mean(self.samples):.0f}" if self.samples else "n/a (row shorter than one sample)"


def train_flops_per_step(model: torch.nn.Module, loss: Any, batch: tuple[dict[str, torch.Tensor], torch.Tensor],
                         precision: str) -> float:
    """FLOPs of one training step's forward and backward on ``batch`` (optimiser update not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    import fuselab.layers.attention  # noqa: F401  (registers the CPU SDPA FLOP formula)

    x, y = batch
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(precision, y.device):
            total, _ = loss(model(x), y)
        total.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def forward_flops_per_sample(model: torch.nn.Module, x: dict[str, torch.Tensor], precision: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, autocast(precision, next(iter(x.values())).device):
        model(x)
    return counter.get_total_flops() / len(next(iter(x.values())))


def timed_runs(configs: list[Any], *, count_flops: bool = False) -> dict[str, Any]:
    """Train every config (every fold of each); per-step seconds, first-epoch seconds, test accuracy and, with
    ``count_flops``, the FLOPs of one epoch (training steps and validation forwards) of the first fold."""
    per_step, first, accuracy, epoch_flops, epoch_seconds = [], [], [], None, []
    for cfg in configs:
        session = prepare_run(cfg, cache=True)
        tcfg = session.train
        for i, part in enumerate(session.parts):
            if i:
                session.reseed()
            model, loss = session.model(part), session.loss()
            steps = math.ceil(len(part.train) / tcfg.batch_size)
            stamps = [time.perf_counter()]

            def on_epoch(epoch: int, row: dict[str, float]) -> None:
                _sync(session.fabric.device)
                stamps.append(time.perf_counter())

            result = fit(model, part, loss, tcfg, seed=session.seed, fabric=session.fabric, on_epoch=on_epoch)
            epochs = [b - a for a, b in zip(stamps, stamps[1:])]
            first.append(epochs[0])
            later = epochs[1:] or epochs
            per_step.extend(e / steps for e in later)
            epoch_seconds.extend(later)
            accuracy.append(result.test.get("accuracy", float("nan")))
            if count_flops and epoch_flops is None:
                epoch_flops = _epoch_flops(cfg, part, tcfg, session.fabric.device)
    return {"runs": len(configs), "s_step": statistics.median(per_step), "first": statistics.median(first),
            "accuracy": statistics.mean(accuracy), "epoch_flops": epoch_flops,
            "epoch_s": statistics.median(epoch_seconds)}


def _epoch_flops(cfg: Any, part: Any, tcfg: Any, device: torch.device) -> float:
    """One epoch's counted FLOPs (every training sample's forward and backward, every validation sample's
    forward) of a freshly built model of ``cfg`` on ``device``."""
    from fuselab.train.loop import data_to_device
    from fuselab.train.session import build_loss, build_model

    data = data_to_device(part, device, test=False)
    model = build_model(cfg, part).to(device)
    index = torch.arange(min(tcfg.batch_size, len(data.train)), device=device)
    step = train_flops_per_step(model, build_loss(cfg), data.train.take(index), tcfg.precision)
    val_x, _ = data.val.take(torch.arange(min(64, len(data.val)), device=device))
    return step / len(index) * len(part.train) + len(part.val) * forward_flops_per_sample(model, val_x, tcfg.precision)


def row_configs(args: argparse.Namespace) -> dict[str, list[Any]]:
    """The configs of each row: the full specs on a GPU, tiny ones in a dry run."""
    common = [f"train.accelerator={args.accelerator}", f"train.precision={args.precision}",
              f"train.channels_last={str(args.channels_last).lower()}", f"train.compile={str(args.compile).lower()}",
              "train.checkpoint=false"]
    if args.threads:
        common.append(f"train.threads={args.threads}")
    dry = ["train.epochs=1"] if args.dry_run else []

    def configs(spec_name: str, methods: list[str], extra: list[str]) -> list[Any]:
        spec = load_spec(spec_name)
        out = []
        for method in methods:
            cfg = spec.config(method, seed=0)
            out.append(make_config(OmegaConf.to_container(cfg, resolve=True), [*common, *dry, *extra]))
        return out

    mfeat = [m.name for m in load_spec("mfeat-compare").methods]
    return {
        "mfeat-compare": configs("mfeat-compare", mfeat[:2] if args.dry_run else mfeat, []),
        "mbt avmnist": configs("avmnist-compare", ["bottleneck/clean"],
                               ["data.train_size=128", "data.val_size=64", "data.test_size=64"] if args.dry_run else []),
        "landsat": configs("landsat-cd-compare", ["concat"],
                           ["data.fold=0", "data.tile_stride=32", "model.widths=[8,16,16]"] if args.dry_run else []),
    }


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same table, no figures")
    parser.add_argument("--precision", default="bf16-mixed", help="train.precision of every run (bf16-mixed)")
    parser.add_argument("--channels-last", action="store_true", help="train.channels_last=true")
    parser.add_argument("--compile", action="store_true", help="train.compile=true")
    parser.add_argument("--threads", type=int, default=None, help="train.threads (dry run: 1)")
    parser.add_argument("--matmul-size", type=int, default=None, help="side of the peak matmul (8192; dry run 256)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.accelerator, args.threads = "cpu", args.threads or 1
    elif torch.cuda.is_available():
        args.accelerator = "cuda"
    else:
        parser.error("no CUDA device: this script measures the GPU path; use --dry-run to check it on a CPU")
    device = torch.device("cuda" if args.accelerator == "cuda" else "cpu")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16 if device.type == "cuda" else torch.bfloat16}.get(
        args.precision, torch.float32)
    peak = matmul_peak(device, dtype, args.matmul_size or (256 if args.dry_run else 8192))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for label, configs in row_configs(args).items():
        with Utilisation(device) as util:
            measured = timed_runs(configs, count_flops=label == "mbt avmnist")
        rate = measured["epoch_flops"] / measured["epoch_s"] if measured["epoch_flops"] else None
        rows.append({
            "row": label, "runs": str(measured["runs"]), "device": name, "precision": args.precision,
            "s/step": f"{measured['s_step']:.4f}", "first epoch s": f"{measured['first']:.2f}",
            "GPU util %": util.mean, "test accuracy": f"{measured['accuracy']:.4f}",
            "TFLOP/s": f"{rate / 1e12:.4f}" if rate else "-", "of matmul peak": f"{rate / peak:.3f}" if rate else "-",
        })
    rows.append({"row": "matmul peak", "runs": "-", "device": name, "precision": str(dtype).replace("torch.", ""),
                 "s/step": "-", "first epoch s": "-", "GPU util %": "-", "test accuracy": "-",
                 "TFLOP/s": f"{peak / 1e12:.4f}", "of matmul peak": "1.000"})
    print(("dry run (CPU, tiny sizes): the numbers check the script, they are no figures\n" if args.dry_run else "")
          + "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row[c] for c in COLUMNS) + " |")
    return rows


if __name__ == "__main__":
    main()
