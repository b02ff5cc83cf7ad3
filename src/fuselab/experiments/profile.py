"""Cost of each method of a spec: parameters, FLOPs per sample, inference latency and peak memory.

Per method (its model as the first seed's run config describes it: from the store when the experiment has
been planned there, so matched widths and tuned values are included, else from the spec):

* ``params``: trainable and frozen parameters;
* ``flops``: forward FLOPs per sample (``torch.utils.flop_counter``, SDPA attention counted);
* ``latency_b1_ms``, ``latency_b64_ms``: median wall time of one forward pass in eval mode without
  gradients, after warm-up, at batch 1 and 64 (inputs from the training split);
* ``peak_mem_mb``: on CUDA the maximum memory allocated while the model is built and runs a batch of 64;
  on the CPU the growth of the process's peak resident set over the same steps (``VmHWM`` after resetting
  it through ``/proc/self/clear_refs``, freed heap returned to the system first).

``fuselab profile SPEC`` writes ``<store>/<experiment>/profile/profile.{csv,md}``; the comparison report
adds these columns to its table and CSV when the file is there.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

COLUMNS = ("params", "flops", "latency_b1_ms", "latency_b64_ms", "peak_mem_mb")
BATCHES = (1, 64)


@dataclasses.dataclass
class MethodProfile:
    method: str
    params: int
    flops: float  # per sample
    latency_b1_ms: float
    latency_b64_ms: float
    peak_mem_mb: float
    device: str


def module_flops(module: nn.Module, *args: Any, **kwargs: Any) -> int:
    """Forward FLOPs of ``module(*args, **kwargs)`` in eval mode without gradients (SDPA counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    import fuselab.layers.attention  # noqa: F401  (registers the CPU SDPA formula)

    was_training = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            module(*args, **kwargs)
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_latency(fn: Callable[[], Any], device: torch.device, *, warmup: int = 10, repeat: int = 50) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory in bytes while ``fn()`` runs: CUDA max allocated (above what was allocated before), or on
    the CPU the growth of the peak resident set (nan where the platform cannot tell)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        keep = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del keep
        return float(peak)
    _trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        return float("nan")
    before = _rss_kib("VmRSS")
    keep = fn()
    peak = _rss_kib("VmHWM")
    del keep
    if before is None or peak is None:
        return float("nan")
    return float(max(0, peak - before) * 1024)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from fuselab.train.config import ConfigError

        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def _batch(data: Any, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    split = data.train
    index = torch.arange(n) % len(split)  # a split smaller than the batch repeats its samples
    x, _ = split.take(index)
    return {m: v.to(device) for m, v in x.items()}


def profile_config(cfg: Any, data: Any, *, device: torch.device, method: str = "", warmup: int = 10,
                   repeat: int = 50) -> MethodProfile:
    """Profile the model of one resolved run config on ``data`` (its ``DataBundle``)."""
    from fuselab.report.plots import flops_per_sample
    from fuselab.train.loop import count_parameters
    from fuselab.train.run import build_model

    flops = float(flops_per_sample(cfg, data))
    inputs = {b: _batch(data, b, device) for b in BATCHES}

    def build_and_run() -> Any:
        model = build_model(cfg, data).to(device).eval()
        with torch.no_grad():
            out = model(inputs[BATCHES[-1]])
        return model, out

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peak = peak_memory(build_and_run, device)
        model = build_model(cfg, data).to(device).eval()
    params = count_parameters(model)
    latencies = {}
    with torch.no_grad():
        for b in BATCHES:
            latencies[b] = median_latency(lambda b=b: model(inputs[b]), device, warmup=warmup, repeat=repeat)
    return MethodProfile(method, params, flops, latencies[1] * 1e3, latencies[64] * 1e3, peak / 2**20, str(device))


def method_configs(spec: Any, store: str | Path | None = None) -> dict[str, Any]:
    """Per method the run config of its first seed: from the store's plan of the experiment when there is
    one (matched widths and tuned values included), else from the spec (the spec's own order)."""
    from fuselab.experiments.store import Store
    from fuselab.train.config import make_config

    if store is not None:
        st = Store(store)
        if st.exists():
            try:
                runs = st.experiment_runs(spec.name)
            except Exception:  # noqa: BLE001 - no such experiment in this store: plan from the spec
                runs = []
            if runs:
                first: dict[str, Any] = {}
                for run in sorted(runs, key=lambda r: r["seed"]):
                    first.setdefault(run["method"], make_config(run["config"]))
                order = [m.name for m in spec.methods if m.name in first] + [m for m in first if m not in
                                                                           {x.name for x in spec.methods}]
                return {m: first[m] for m in order}
    plan = spec.plan()
    out: dict[str, Any] = {}
    for run in plan:
        out.setdefault(run.method, run.config)
    return out


def profile_spec(spec: Any, *, store: str | Path | None = None, device: str = "auto", threads: int | None = None,
                 warmup: int = 10, repeat: int = 50, methods: Sequence[str] | None = None,
                 on_method: Callable[[MethodProfile], None] | None = None) -> pd.DataFrame:
    """One row per method with :data:`COLUMNS` (see the module's docstring) and ``device``."""
    from omegaconf import OmegaConf

    from fuselab.train.config import ConfigError
    from fuselab.train.run import build_data

    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(int(threads))
    torch.set_flush_denormal(True)
    configs = method_configs(spec, store)
    if methods:
        unknown = [m for m in methods if m not in configs]
        if unknown:
            raise ConfigError(f"spec '{spec.name}' has no method '{unknown[0]}'; methods are: {', '.join(configs)}")
        configs = {m: configs[m] for m in methods}
    data_cache: dict[str, Any] = {}
    rows = []
    for name, cfg in configs.items():
        key = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True)
        if key not in data_cache:
            data_cache[key] = build_data(cfg)
        data = data_cache[key]
        if data.folds:
            data = data.folds[0]
        try:
            prof = profile_config(cfg, data, device=dev, method=name, warmup=warmup, repeat=repeat)
        except ValueError as exc:
            raise ConfigError(f"method '{name}': {str(exc).splitlines()[0]}") from None
        rows.append(dataclasses.asdict(prof))
        if on_method is not None:
            on_method(prof)
    frame = pd.DataFrame(rows, columns=["method", *COLUMNS, "device"])
    frame.attrs.update(threads=torch.get_num_threads(), device=str(dev), warmup=warmup, repeat=repeat)
    return frame


def profile_dir(store: str | Path, experiment: str) -> Path:
    return Path(store) / experiment / "profile"


def to_markdown(frame: pd.DataFrame, caption: str = "") -> str:
    head = ["Method", "Params", "FLOPs / sample", "Latency b1 (ms)", "Latency b64 (ms)", "Peak memory (MB)"]
    lines = ([caption, ""] if caption else []) + ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
    for r in frame.itertuples(index=False):
        lines.append(f"| {r.method} | {int(r.params):,} | {human(r.flops)} | {r.latency_b1_ms:.3f} | "
                     f"{r.latency_b64_ms:.3f} | {r.peak_mem_mb:.2f} |")
    return "\n".join(lines) + "\n"


def human(value: float) -> str:
    """1234567 -> 1.23M (FLOPs)."""
    if value != value:  # nan
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def write_profile(frame: pd.DataFrame, store: str | Path, experiment: str) -> dict[str, Path]:
    out = profile_dir(store, experiment)
    out.mkdir(parents=True, exist_ok=True)
    a = frame.attrs
    caption = (f"{experiment}: cost per method on {a.get('device', '?')} ({a.get('threads', '?')} torch threads); "
               f"latency = median of {a.get('repeat', '?')} forward passes after {a.get('warmup', '?')} warm-up, "
               "eval mode, no gradients")
    files = {"csv": out / "profile.csv", "markdown": out / "profile.md"}
    frame.to_csv(files["csv"], index=False)
    files["markdown"].write_text(to_markdown(frame, caption), encoding="utf-8")
    return files


def load_profile(store: str | Path, experiment: str) -> pd.DataFrame | None:
    """The profile written by ``fuselab profile`` for an experiment, if any."""
    path = profile_dir(store, experiment) / "profile.csv"
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
