"""Cost of each method of a spec: parameters, FLOPs per sample, inference latency and peak memory.

Per method (its model as the first seed's run config describes it: from the store when the experiment has
been planned there, so matched widths and tuned values are included, else from the spec):

* ``params``: trainable and frozen parameters;
* ``flops``: forward FLOPs per sample (``torch.utils.flop_counter``, SDPA attention counted);
* ``latency_b1_ms``, ``latency_b64_ms``: median wall time of one forward pass in eval mode without
  gradients, after warm-up, at batch 1 and 64 (inputs from the training split), with the first and third
  quartiles over the repetitions (``latency_b1_ms_q1``, ``latency_b1_ms_q3``, ...): a wide interquartile
  range means the machine was busy, and :func:`spread_warnings` says so;
* ``peak_mem_mb``: on CUDA the maximum memory allocated while the model is built and runs a batch of 64;
  on the CPU the growth of the process's peak resident set over the same steps (``VmHWM`` after resetting
  it through ``/proc/self/clear_refs``, freed heap returned to the system first).

``fuselab profile SPEC --store STORE`` writes ``<store>/<experiment>/profile/profile.{csv,md}`` (the same
store as ``fuselab compare``, whose report adds these columns, latency with its interquartile range, to its
table and CSV when the file is there); the Markdown says when the store does not hold the experiment yet.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from fuselab.train.flops import flops_per_sample  # noqa: F401  (re-exported: counted in one place)

COLUMNS = ("params", "flops", "latency_b1_ms", "latency_b64_ms", "peak_mem_mb")
SPREAD_COLUMNS = ("latency_b1_ms_q1", "latency_b1_ms_q3", "latency_b64_ms_q1", "latency_b64_ms_q3")
BATCHES = (1, 64)
# interquartile range over median above which a latency is reported as unsteady (the machine was busy);
# the comparison report (report.tables) uses the same limit
LATENCY_SPREAD_LIMIT = 0.25
SPREAD_LIMIT = LATENCY_SPREAD_LIMIT


@dataclasses.dataclass
class MethodProfile:
    method: str
    params: int
    flops: float  # per sample
    latency_b1_ms: float
    latency_b64_ms: float
    peak_mem_mb: float
    device: str
    latency_b1_ms_q1: float = float("nan")  # quartiles over the repetitions
    latency_b1_ms_q3: float = float("nan")
    latency_b64_ms_q1: float = float("nan")
    latency_b64_ms_q3: float = float("nan")


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


def latency_times(fn: Callable[[], Any], device: torch.device, *, warmup: int = 10, repeat: int = 50) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def quartiles(times: Sequence[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` of ``times`` (linear interpolation, as ``numpy.percentile``); one time is all three."""
    ordered = sorted(float(t) for t in times)
    if not ordered:
        raise ValueError("no times to summarise")

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return at(0.25), at(0.5), at(0.75)


def median_latency(fn: Callable[[], Any], device: torch.device, *, warmup: int = 10, repeat: int = 50) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after ``warmup`` calls."""
    return statistics.median(latency_times(fn, device, warmup=warmup, repeat=repeat))


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
        from fuselab.errors import ConfigError

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
    latencies = {}  # batch -> (q1, median, q3) in ms
    with torch.no_grad():
        for b in BATCHES:
            times = latency_times(lambda b=b: model(inputs[b]), device, warmup=warmup, repeat=repeat)
            latencies[b] = tuple(t * 1e3 for t in quartiles(times))
    return MethodProfile(method, params, flops, latencies[1][1], latencies[64][1], peak / 2**20, str(device),
                         latency_b1_ms_q1=latencies[1][0], latency_b1_ms_q3=latencies[1][2],
                         latency_b64_ms_q1=latencies[64][0], latency_b64_ms_q3=latencies[64][2])


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
    from fuselab.errors import ConfigError
    from fuselab.train.session import cached_data, setup_process

    dev = resolve_device(device)
    setup_process(threads)
    configs = method_configs(spec, store)
    if methods:
        unknown = [m for m in methods if m not in configs]
        if unknown:
            raise ConfigError(f"spec '{spec.name}' has no method '{unknown[0]}'; methods are: {', '.join(configs)}")
        configs = {m: configs[m] for m in methods}
    rows = []
    for name, cfg in configs.items():
        data = cached_data(cfg)
        if data.folds:
            data = data.folds[0]
        try:
            prof = profile_config(cfg, data, device=dev, method=name, warmup=warmup, repeat=repeat)
        except ValueError as exc:
            raise ConfigError(f"method '{name}': {str(exc).splitlines()[0]}") from None
        rows.append(dataclasses.asdict(prof))
        if on_method is not None:
            on_method(prof)
    frame = pd.DataFrame(rows, columns=["method", *COLUMNS, *SPREAD_COLUMNS, "device"])
    frame.attrs.update(threads=torch.get_num_threads(), device=str(dev), warmup=warmup, repeat=repeat)
    return frame


def profile_dir(store: str | Path, experiment: str) -> Path:
    return Path(store) / experiment / "profile"


def spread_warnings(frame: pd.DataFrame, limit: float = SPREAD_LIMIT) -> list[str]:
    """One line per method and batch size whose latency's interquartile range exceeds ``limit`` times its
    median: the repetitions disagree, so the median is not a figure to compare methods by."""
    out = []
    for r in frame.to_dict("records"):
        for b in BATCHES:
            median = r.get(f"latency_b{b}_ms")
            q1, q3 = r.get(f"latency_b{b}_ms_q1"), r.get(f"latency_b{b}_ms_q3")
            if median is None or q1 is None or q3 is None or not median > 0 or (q3 - q1) != (q3 - q1):
                continue
            if (q3 - q1) / median > limit:
                out.append(f"{r['method']}: latency at batch {b} is unsteady, interquartile range "
                           f"{q1:.3f}–{q3:.3f} ms around a median of {median:.3f} ms "
                           f"({(q3 - q1) / median * 100:.0f} % of it, above {limit * 100:.0f} %); the machine was "
                           "probably busy: profile again on an idle machine, or with a larger --repeat")
    return out


def _latency_cell(r: Any, batch: int) -> str:
    median = getattr(r, f"latency_b{batch}_ms")
    q1, q3 = getattr(r, f"latency_b{batch}_ms_q1", float("nan")), getattr(r, f"latency_b{batch}_ms_q3", float("nan"))
    return f"{median:.3f}" if q1 != q1 or q3 != q3 else f"{median:.3f} [{q1:.3f}–{q3:.3f}]"


def to_markdown(frame: pd.DataFrame, caption: str = "", notes: Sequence[str] = ()) -> str:
    """The profile as a Markdown table; latency cells read ``median [q1–q3]``; unsteady latencies
    (:func:`spread_warnings`) and the ``notes`` follow the table."""
    head = ["Method", "Params", "FLOPs / sample", "Latency b1 (ms)", "Latency b64 (ms)", "Peak memory (MB)"]
    lines = ([caption, ""] if caption else []) + ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
    for r in frame.itertuples(index=False):
        lines.append(f"| {r.method} | {int(r.params):,} | {human(r.flops)} | {_latency_cell(r, 1)} | "
                     f"{_latency_cell(r, 64)} | {r.peak_mem_mb:.2f} |")
    extra = [f"⚠ {line}" for line in spread_warnings(frame)] + list(notes)
    if extra:
        lines += [""] + [f"- {line}" for line in extra]
    return "\n".join(lines) + "\n"


def store_note(store: str | Path, experiment: str) -> str:
    """A line when ``store`` does not hold ``experiment`` (its report cannot show the profile), else ``""``."""
    from fuselab.experiments.store import Store

    st = Store(store)
    held = False
    if st.exists():
        try:
            held = bool(st.experiment_runs(experiment))
        except Exception:  # noqa: BLE001 - an unknown experiment: not held
            held = False
    if held:
        return ""
    return (f"the store '{store}' holds no experiment '{experiment}' yet: profiled from the spec; the report "
            f"shows these columns once `fuselab compare` has run with the same --store (or profile again with "
            f"--store set to the folder where the experiment is)")


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
               f"latency = median [interquartile range] of {a.get('repeat', '?')} forward passes after "
               f"{a.get('warmup', '?')} warm-up, eval mode, no gradients")
    files = {"csv": out / "profile.csv", "markdown": out / "profile.md"}
    frame.to_csv(files["csv"], index=False)
    note = store_note(store, experiment)
    files["markdown"].write_text(to_markdown(frame, caption, notes=[note] if note else []), encoding="utf-8")
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


# -- how long a sweep will take ------------------------------------------------------------------


def time_training_step(cfg: Any, data: Any, *, steps: int = 5, warmup: int = 1, threads: int | None = None) -> dict[str, float]:
    """Seconds of one training step and of one evaluation pass of the model ``cfg`` describes, measured here.

    A step is what the training loop does per batch: forward on ``train.batch_size`` samples of the
    training split, the configured loss, backward, an AdamW step (on the CPU; the loop's optimizer may
    differ, its cost per step is of the same order). An evaluation batch is one forward pass without
    gradients on ``train.eval_batch_size`` validation samples. Medians over ``steps`` after ``warmup``.

    Returns:
        ``{"step": s, "eval_batch": s, "build": s}`` (``build``: building the model once); a model that is
        not trained (``needs_training = False``) has step 0.
    """
    from fuselab.losses import WeightedLoss
    from fuselab.train.config import section
    from fuselab.train.run import build_model

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            built = time.perf_counter()
            model = build_model(cfg, data)
            build_seconds = time.perf_counter() - built
            batch = int(cfg.train.batch_size)
            x = _batch(data, min(batch, len(data.train)), torch.device("cpu"))
            index = torch.arange(min(batch, len(data.train)))
            _, y = data.train.take(index)
            times = []
            if getattr(model, "needs_training", True) is not False:
                loss = WeightedLoss(section(cfg, "loss")["terms"])
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                model.train()
                for i in range(warmup + steps):
                    start = time.perf_counter()
                    total, _ = loss(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    optimizer.step()
                    if i >= warmup:
                        times.append(time.perf_counter() - start)
            model.eval()
            n_eval = min(int(cfg.train.eval_batch_size), len(data.val))
            xv = _batch(dataclasses.replace(data, train=data.val), n_eval, torch.device("cpu"))
            evals = []
            with torch.no_grad():
                for i in range(warmup + max(1, steps // 2)):
                    start = time.perf_counter()
                    model(xv)
                    if i >= warmup:
                        evals.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {"step": statistics.median(times) if times else 0.0, "eval_batch": statistics.median(evals),
            "build": build_seconds}


def run_seconds(cfg: Any, data: Any, timing: Mapping[str, float]) -> float:
    """Seconds one run of ``cfg`` takes at most (every epoch trained; early stopping shortens it): building
    its data and model, its training steps, a validation pass per epoch and one test pass, at the measured
    ``timing`` (:func:`time_training_step`, plus ``data``: seconds to build the dataset)."""
    import math

    epochs = int(cfg.train.epochs)
    steps = data.train.training_steps(int(cfg.train.batch_size), merge_lone=cfg.train.last_batch == "merge")
    eval_batches = math.ceil(len(data.val) / int(cfg.train.eval_batch_size))
    test_batches = math.ceil(len(data.test) / int(cfg.train.eval_batch_size))
    compute = epochs * (steps * timing["step"] + eval_batches * timing["eval_batch"]) + test_batches * timing["eval_batch"]
    return compute + timing.get("build", 0.0) + timing.get("data", 0.0)


def worker_start_seconds() -> float:
    """Seconds a new Python process takes to import the training code, as each of a sweep's worker processes
    does once (spawned, so nothing is inherited): measured by starting one."""
    import subprocess
    import sys

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import fuselab.train.run"], capture_output=True, check=False)
    return time.perf_counter() - start


@dataclasses.dataclass
class SweepEstimate:
    seconds: float  # wall time of the runs to train over the jobs
    per_method: dict[str, tuple[float, str]]  # method -> (seconds of one run, how it was estimated)
    how: list[str]  # one line per way of estimating, naming its methods
    startup: float = 0.0  # seconds before a worker trains its first run (included in ``seconds``)


def estimate_sweep(runs: Sequence[Any], *, store_runs: Sequence[Mapping[str, Any]] = (), jobs: int = 1,
                   cores: int = 1, steps: int = 5, startup: bool = True) -> SweepEstimate:
    """How long training ``runs`` (planned runs with ``method`` and resolved ``config``) will take.

    Per method: the median ``seconds`` of its finished runs in ``store_runs`` (rows of
    ``Store.experiment_runs``) where there are any, else the model timed here (:func:`time_training_step`,
    with the torch threads each of ``jobs`` parallel runs gets out of ``cores``) times its steps and
    evaluation passes (:func:`run_seconds`). The wall time spreads the runs over ``jobs`` and, with
    ``startup``, adds the measured start of the worker processes (:func:`worker_start_seconds`).
    """
    from fuselab.train.run import build_data

    threads = max(1, cores // max(1, jobs))
    finished: dict[str, list[float]] = {}
    for r in store_runs:
        seconds = (r.get("metrics") or {}).get("seconds")
        if r.get("status") == "done" and seconds is not None:
            finished.setdefault(r["method"], []).append(float(seconds))
    per_method: dict[str, tuple[float, str]] = {}
    datasets: dict[str, Any] = {}
    for run in runs:
        if run.method in per_method:
            continue
        if run.method in finished:
            values = finished[run.method]
            per_method[run.method] = (statistics.median(values), f"median of {len(values)} finished runs in the store")
            continue
        key = json.dumps(_plain(run.config.data), sort_keys=True, default=str)
        if key not in datasets:  # every run builds its data again: its time is part of each run
            started = time.perf_counter()
            datasets[key] = (build_data(run.config), time.perf_counter() - started)
        data, data_seconds = datasets[key]
        timing = {**time_training_step(run.config, data, steps=steps, threads=threads), "data": data_seconds}
        per_method[run.method] = (run_seconds(run.config, data, timing),
                                  f"timed {steps} training steps here ({timing['step'] * 1000:.1f} ms per step, "
                                  f"{threads} thread{'s' if threads > 1 else ''})")
    total = sum(per_method[r.method][0] for r in runs)
    start = worker_start_seconds() if startup and runs else 0.0
    wall = start + total / max(1, min(jobs, len(runs)))
    how: dict[str, list[str]] = {}
    for method, (_, text) in per_method.items():
        how.setdefault("from the store" if text.startswith("median") else "timed", []).append(method)
    lines = []
    if how.get("timed"):
        lines.append(f"{', '.join(how['timed'])}: timed here, per model: building its data and model, {steps} "
                     "training steps and an evaluation pass, times the steps and passes of every epoch")
    if how.get("from the store"):
        lines.append(f"{', '.join(how['from the store'])}: median time of the finished runs of the method in the store")
    if start:
        lines.append(f"starting the workers: {start:.1f} s, measured by starting one Python process that imports "
                     "the training code (the jobs start in parallel)")
    return SweepEstimate(seconds=wall, per_method=per_method, how=lines, startup=start)


def _plain(node: Any) -> Any:
    """A config section as plain containers (a dict stays as it is)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if hasattr(node, "_get_node") else node
