"""The ``fuselab`` command: list, run, compare, report."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fuselab.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="fuselab: multimodal-fusion operators, models and fair comparisons.",
)
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)

DEFAULT_STORE = Path("runs")
PLUGIN_OPTION = typer.Option(None, "--plugin", help="a plugin .py file or module to load first (repeatable)")
DEFAULT_SPEC = "mfeat-compare"


METHODS_HELP = "only these methods (comma-separated)"
METHOD_ALIAS = typer.Option(None, "--method", hidden=True, help="one method (repeatable); same as --methods")


def _method_names(methods: Optional[str], method: Optional[list[str]], spec) -> list[str]:
    """The methods named by ``--methods a,b`` and the older ``--method a --method b``, checked against the
    spec (one line with the closest name for a typo); empty when neither option is given."""
    names = [m.strip() for m in (methods or "").split(",") if m.strip()] + list(method or [])
    names = list(dict.fromkeys(names))
    known = [m.name for m in spec.methods]
    for name in names:
        if name not in known:
            raise _unknown_method("--methods", name, spec.name, known)
    if methods is not None and not names:
        raise _unknown_method("--methods", methods, spec.name, known)
    return names


def _plain_output() -> bool:
    """Output goes to a file or a pipe: print plain lines, never truncated to a width."""
    return not console.is_terminal


def _print_row(*cells: str) -> None:
    """One tab-separated line as it is (rich would expand the tabs)."""
    console.file.write("\t".join(cells) + "\n")


@app.command("list")
def list_cmd(
    what: str = typer.Argument("fusions", help="fusions | models | datasets | losses | specs"),
    pattern: str = typer.Option("*", "--pattern", "-p", help="shell-style filter on ids"),
    plugin: Optional[list[str]] = PLUGIN_OPTION,
) -> None:
    """List registered fusions, models, datasets, loss terms or shipped specs."""
    from fuselab.plugins import load_plugins

    load_plugins(plugin or [])
    import fuselab.train.config  # noqa: F401  (registers everything)
    from fuselab.api import fusion_info
    from fuselab.experiments.spec import shipped_specs
    from fuselab.registry import DATASETS, FUSIONS, LOSSES, MODELS

    registries = {"fusions": FUSIONS, "models": MODELS, "datasets": DATASETS, "losses": LOSSES}
    if what == "specs":
        for name in sorted(shipped_specs()):
            console.print(name)
        return
    if what not in registries:
        raise ConfigError(f"cannot list '{what}'; choose one of: {', '.join([*registries, 'specs'])}")
    ids = registries[what].list(pattern)
    if what != "fusions":
        for i in ids:
            console.print(i, markup=False, highlight=False)
        return
    if _plain_output():  # one fusion a line, tab-separated, nothing cut: ids to copy and grep
        _print_row("id", "contract", "forms", "paper")
        for i in ids:
            info = fusion_info(i)
            contract = info.contract if info.kind in ("merge",) else f"{info.contract} ({info.kind})"
            _print_row(i, contract, ", ".join(info.forms), info.paper)
        return
    table = Table(title=f"{len(ids)} fusion operators", show_lines=False)
    for col in ("id", "contract", "forms", "paper"):
        table.add_column(col)
    for i in ids:
        info = fusion_info(i)
        contract = info.contract if info.kind in ("merge",) else f"{info.contract} ({info.kind})"
        table.add_row(i, contract, ", ".join(info.forms), info.paper)
    console.print(table)


@app.command("run")
def run_cmd(
    config: Optional[Path] = typer.Argument(None, help="a YAML run config (defaults apply without one)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. fusion.name=lmf train.epochs=20"),
    out: Path = typer.Option(Path("runs/single"), "--out", "-o", help="parent folder of the run folder"),
    force: bool = typer.Option(False, "--force", help="train again and replace a run folder of the same config and seed"),
    plugin: Optional[list[str]] = PLUGIN_OPTION,
) -> None:
    """Train one model from a config and print its test metrics."""
    import os
    import warnings

    rank_zero = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"
    if not rank_zero:
        console.quiet = True  # in a multi-process run only rank 0 reports
    # the folder is new or emptied below: Lightning's notice about replacing its logs says nothing to the user
    warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted.*")
    from fuselab.plugins import load_plugins

    load_plugins(plugin or [])
    from fuselab.experiments.spec import run_id
    from fuselab.train.config import make_config, read_yaml
    from fuselab.train.run import execute

    items = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        items.insert(0, str(config))
        config = None
    cfg = make_config(read_yaml(config) if config else None, items)
    run_dir = out / run_id(cfg)
    if rank_zero and run_dir.exists():  # the same config and seed: never replaced silently
        if not force:
            raise ConfigError(f"run folder '{run_dir}' exists (same config and seed); pass --force to train again "
                              "and replace it, or --out to write elsewhere")
        import shutil

        shutil.rmtree(run_dir)
    epochs = int(cfg.train.epochs)
    what = f"{cfg.fusion.name} on {cfg.data.name} with {cfg.model.name}"
    from fuselab.registry import MODELS

    if getattr(MODELS.get(cfg.model.name), "own_fusion", False):  # cen, cva: the fusion section is unused
        what = f"{cfg.model.name} on {cfg.data.name}"
    console.print(f"[bold]run[/] {what}, seed {cfg.seed} -> {run_dir}")
    with Progress(TextColumn("epoch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("train", total=epochs, info="")

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            progress.update(task, completed=epoch + 1,
                            info=f"loss {row['train_loss']:.3f}  val acc {row['val_accuracy'] * 100:.2f}")

        created = run_dir  # the outermost folder this run creates: removed again if it fails
        while not created.parent.exists() and created.parent != created:
            created = created.parent
        existed = created.exists()
        try:
            result = execute(cfg, run_dir, on_epoch=on_epoch)
        except BaseException as exc:
            if not existed:  # a failed run leaves nothing behind
                import shutil

                shutil.rmtree(created, ignore_errors=True)
            from fuselab.train.loop import NonFiniteLossError

            if isinstance(exc, (MemoryError, RuntimeError)) and _out_of_memory(exc):
                raise ConfigError(f"the model does not fit in memory ({_first_line(exc)}); "
                                  "make it smaller (e.g. model.hidden) or lower train.batch_size") from None
            if isinstance(exc, NonFiniteLossError):
                raise ConfigError(_first_line(exc)) from None
            raise
        progress.update(task, total=len(result.history), completed=len(result.history))
    m = result.metrics
    if m.get("test_in_sample"):
        console.print(IN_SAMPLE_LINE, markup=False)
    if "test_kappa" in m:  # change detection: Kappa first, the headline metric of the field
        console.print(
            f"test Kappa [bold]{m['test_kappa'] * 100:.2f}[/], OA {m['test_accuracy'] * 100:.2f} %, F1 change "
            f"{m['test_f1_change'] * 100:.2f} %, IoU change {m['test_iou_change'] * 100:.2f} %, "
            f"best epoch {m['best_epoch']}, {m['params']:,} parameters, {m['seconds']:.1f} s"
        )
        return
    console.print(
        f"test accuracy [bold]{m['test_accuracy'] * 100:.2f} %[/], macro-F1 {m['test_macro_f1'] * 100:.2f} %, "
        f"best epoch {m['best_epoch']}, {m['params']:,} parameters, {m['seconds']:.1f} s"
    )


IN_SAMPLE_LINE = ("in-sample: the test split holds the training samples too (data.fold=all), so these test metrics "
                  "measure the fit; score held-out data with `fuselab evaluate`")


def _duration(seconds: float) -> str:
    """``12.3 s`` under a minute, else ``m:ss`` or ``h:mm:ss``."""
    return f"{seconds:.1f} s" if seconds < 59.95 else _clock(seconds)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class RunProgress:
    """Progress of long work made of items (runs, evaluations, trials, methods): a rich bar when the console
    is a terminal; otherwise one plain line per finished item, so that a log file under nohup or a batch
    scheduler shows how far the work is::

        [3/6] 0:12 elapsed, ETA 0:24  sum seed 1: trained, test accuracy 91.25 %  (0 failed)

    The ETA divides the time so far by the items that did work (items read back from the store take no
    time) and multiplies by the items left; it is "?" until one item has worked.
    """

    def __init__(self, total: int | None, *, label: str = "runs", out: Console | None = None) -> None:
        self.total, self.label = total, label
        self.console = out or console
        self.finished = self.worked = self.failed = 0
        self.start = time.perf_counter()
        self.bar: Progress | None = None
        self.task = None

    def __enter__(self) -> "RunProgress":
        self.start = time.perf_counter()
        if self.console.is_terminal:
            self.bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total, info="")
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def print(self, message: str) -> None:
        """A line above the bar (or in the log)."""
        (self.bar.console if self.bar else self.console).print(message, markup=False, highlight=False)

    def eta(self, elapsed: float) -> str:
        left = (self.total or 0) - self.finished
        if left <= 0:
            return "0:00"
        if not self.worked:
            return "?"
        return _clock(elapsed / self.worked * left)

    def advance(self, what: str, status: str, *, detail: str = "", worked: bool = True, info: str = "") -> str:
        """One item finished: ``what`` (e.g. "sum seed 1"), its status word, a detail such as its metric,
        whether it took time, and the bar's summary text. Returns the plain line (printed off a terminal)."""
        self.finished += 1
        self.worked += bool(worked)
        self.failed += status == "failed"
        elapsed = time.perf_counter() - self.start
        count = f"{self.finished}/{self.total}" if self.total else str(self.finished)
        line = (f"[{count}] {_clock(elapsed)} elapsed, ETA {self.eta(elapsed)}  {what}: {status}"
                f"{', ' + detail if detail else ''}  ({self.failed} failed)")
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)
        else:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        return line


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text \
        or "not enough memory" in text


@app.command("compare")
def compare_cmd(
    spec: str = typer.Argument(DEFAULT_SPEC, help="a shipped spec name or a path to a spec YAML"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides for every method, e.g. train.epochs=2 data.images=[a,b]"),
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s", help="result store folder"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="parallel runs (default: number of cores)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and an estimate, train nothing"),
    plugin: Optional[list[str]] = PLUGIN_OPTION,
    backend: str = typer.Option("local", "--backend", help="local (processes on this machine) | ray"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: a local instance)"),
    gpus_per_run: float = typer.Option(0.0, "--gpus-per-run", help="GPUs each run asks Ray for"),
    methods: Optional[str] = typer.Option(None, "--methods", "-m",
                                          help="train only these methods (comma-separated); the table shows every finished one"),
) -> None:
    """Run every method x seed of a spec (skipping finished runs) and print the comparison table."""
    from fuselab.experiments.runner import WorkerPool, default_jobs, prepare
    from fuselab.experiments.spec import load_spec
    from fuselab.experiments.store import Store

    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend must be local or ray, got '{backend}'")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs} (leave it out to use every core)")
    sp = load_spec(spec, plugins=plugin or [])
    sp.overrides = list(overrides or [])  # over every method, as `fuselab run` applies them; checked by the plan
    st = Store(store)
    jobs = default_jobs() if jobs is None else jobs
    wanted = _method_names(methods, None, sp)  # checked before the store is touched: a typo leaves nothing behind
    if dry_run:
        _print_plan(sp, st, jobs, wanted)
        return
    # with several jobs the workers start now: their imports overlap with the planning below
    with WorkerPool(jobs) if backend == "local" and jobs > 1 else contextlib.nullcontext() as pool:
        plan = prepare(sp, st)
        from fuselab.report.commands import record_spec_source

        record_spec_source(st.root, sp.name, spec)  # the journal's and reports' commands name this file
        if wanted:
            plan = [r for r in plan if r.method in wanted]
        start = time.perf_counter()
        counts = _train_plan(sp, st, plan, jobs=jobs, backend=backend, address=address, gpus_per_run=gpus_per_run,
                             pool=pool)
    console.print(f"{counts['done']} trained, {counts['cached']} already in the store, {counts['failed']} failed, "
                  f"{time.perf_counter() - start:.0f} s")
    if sp.evaluate:  # the spec's extra test sets: each done run scored once per set
        from fuselab.experiments.runner import evaluate_plan

        def on_evaluated(run, name: str, status: str) -> None:
            console.print(f"evaluate {name}: {run.method} seed {run.seed} {status}", markup=False)

        scored = evaluate_plan(sp, st, plan, on_run=on_evaluated)
        console.print(f"{sum(scored.values())} evaluations on {', '.join(sp.evaluate)}", markup=False)
    if not _baseline_done(st.root, sp.name, sp.baseline):
        # e.g. --methods without the baseline: the runs are stored, the table waits for the baseline
        console.print(f"no table yet: the baseline '{sp.baseline}' has no finished run; train it with "
                      f"`fuselab compare {spec} --store {st.root} --methods {sp.baseline}`", markup=False)
        return
    _print_report(st.root, sp.name)


def _train_plan(sp, st, plan, *, jobs: int, backend: str, address: str | None, gpus_per_run: float,
                pool=None) -> dict[str, int]:
    """Train a sweep's plan with a progress display; the outcome counts (done, cached, failed, ...)."""
    from fuselab.experiments.runner import execute_plan

    unique = {r.run_id for r in plan}
    console.print(f"[bold]{sp.name}[/]: {len(sp.methods)} methods x {len(sp.seeds)} seeds = {len(unique)} runs, "
                  f"{jobs} jobs{' on Ray' if backend == 'ray' else ''}, store {st.root}")
    counts = {"done": 0, "cached": 0, "failed": 0, "skipped": 0}
    best: dict[str, list[float]] = {}
    key = f"test_{sp.metric}"
    stored = {r["run_id"]: r["metrics"] for r in st.experiment_runs(sp.name) if r["status"] == "done" and r["metrics"]}
    words = {"done": "trained", "cached": "already in the store", "failed": "failed",
             "skipped": "left to another live process", "missing": "folder missing"}
    with RunProgress(len(unique), label="runs") as progress:

        def on_outcome(o) -> None:
            counts[o.status] = counts.get(o.status, 0) + 1
            metrics = o.metrics or (stored.get(o.run_id) if o.status == "cached" else None)
            value = (metrics or {}).get(key)
            if value is not None:  # cached runs count too: the lead is over every finished run
                best.setdefault(o.method, []).append(value)
            lead = max(best.items(), key=lambda kv: sum(kv[1]) / len(kv[1]), default=None)
            lead_text = f"best so far {lead[0]} {sum(lead[1]) / len(lead[1]) * 100:.2f}" if lead else ""
            detail = f"test {sp.metric} {value * 100:.2f} %" if value is not None else (o.error or "")
            progress.advance(f"{o.method} seed {o.seed}", words.get(o.status, o.status),
                             detail=detail.splitlines()[0] if detail else "", worked=o.status in ("done", "failed"),
                             info=f"trained {counts['done']}, cached {counts['cached']}, "
                                  f"failed {counts['failed']}  {lead_text}")
            if o.status == "failed" and progress.bar is not None:
                progress.print(f"failed {o.method} seed {o.seed}: {o.error}")

        try:
            with _interrupts_as_keyboard_interrupt():
                execute_plan(plan, st, jobs=jobs, on_outcome=on_outcome, plugins=sp.plugins, backend=backend,
                             address=address, gpus_per_run=gpus_per_run, pool=pool)
        except KeyboardInterrupt:  # typer would swallow it into a bare exit code
            raise SweepInterrupted() from None
    return counts


def _baseline_done(store: Path, experiment: str, baseline: str) -> bool:
    from fuselab.experiments.results import load_results

    frame = load_results(store, experiment)
    return bool(((frame["method"] == baseline) & (frame["status"] == "done")).any())


class SweepInterrupted(Exception):
    """A sweep stopped by Ctrl-C or SIGTERM, its runs marked interrupted (exit code 130)."""


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: the sweep stops its workers and marks their runs interrupted."""


@contextlib.contextmanager
def _interrupts_as_keyboard_interrupt():
    def on_term(signum, frame):
        raise _Interrupted()

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unknown_method(option: str, name: str, spec: str, known: list[str]) -> Exception:
    """The one-line error for a method name that the spec does not have, with the closest names."""
    import difflib

    close = difflib.get_close_matches(name, known, n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return ConfigError(f"{option}: '{name}' is not a method of {spec}; {hint}methods are {', '.join(known)}")


def _print_plan(sp, st, jobs: int, wanted: list[str] | None = None) -> None:
    """The plan of a sweep (only the ``wanted`` methods when given) and an estimate of its time, measured:
    from finished runs in the store, else by timing a few training steps of each model here."""
    import os

    from fuselab.experiments.profile import estimate_sweep

    plan = [r for r in sp.plan() if not wanted or r.method in wanted]
    done, store_runs = set(), []
    if st.exists():  # a dry run never creates a store
        import sqlite3

        done = st.done_ids()
        try:
            store_runs = st.experiment_runs(sp.name)
        except sqlite3.Error:
            store_runs = []
    table = Table(title=f"plan of {sp.name} (baseline: {sp.baseline})")
    for col in ("method", "seeds", "to train"):
        table.add_column(col)
    for method in sp.methods:
        runs = [r for r in plan if r.method == method.name]
        if runs:
            table.add_row(method.name, ", ".join(str(r.seed) for r in runs), str(sum(r.run_id not in done for r in runs)))
    console.print(table)
    todo = list({r.run_id: r for r in plan if r.run_id not in done}.values())
    total = len({r.run_id for r in plan})
    if not todo:
        console.print(f"0 of {total} runs to train: every run is in the store")
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    estimate = estimate_sweep(todo, store_runs=store_runs, jobs=jobs, cores=cores)
    console.print(f"{len(todo)} of {total} runs to train with {jobs} jobs; estimate {_duration(estimate.seconds)} "
                  "(at most: early stopping shortens runs)", markup=False, highlight=False)
    for method, (seconds, how) in estimate.per_method.items():
        console.print(f"  {method}: {_duration(seconds)} per run; {how}", markup=False, highlight=False)
    console.print("estimated from: " + "; ".join(estimate.how), markup=False, highlight=False)


def _print_report(store: Path, experiment: str, **options) -> None:
    """Write the report (after a sweep: PNG plots, SVG figure and HTML only, FLOPs from cache: fast)."""
    from fuselab.report.experiment import build_report

    from fuselab.experiments.store import MISSING, Store

    options = {"pdf": False, "flops": "cached", **options}
    report = build_report(store, experiment, **options)
    console.print(report.markdown, markup=False, highlight=False)
    missing = sum(r["status"] == MISSING for r in Store(store).experiment_runs(experiment))
    from fuselab.report.commands import command, spec_argument, store_args

    if missing:
        retry = command("runs", "retry", "--store", str(store), "--experiment", experiment, "--status", "missing")
        again = command("compare", spec_argument(store, experiment), *store_args(store))
        console.print(f"{missing} runs are done in the store but their folders are missing (left out); "
                      f"`{retry}` and `{again}` train them again", markup=False, highlight=False)
    if report.failed:
        again = command("compare", spec_argument(store, experiment), *store_args(store))
        console.print(f"{report.failed} runs failed; `{again}` retries them", markup=False, highlight=False)
    tables = ("markdown", "latex", "csv")
    console.print(f"tables: {', '.join(str(report.files[k]) for k in tables)}")
    extra = [k for k in report.files if k not in tables]
    if extra:
        plots = sum(k.startswith("plot:") for k in extra)
        html = report.files.get("html")
        console.print(f"report: {report.files['report'].parent}/ ({plots} plots"
                      f"{', network figure' if 'figure' in report.files else ''}){f', {html}' if html else ''}")


@app.command("tune")
def tune_cmd(
    spec: str = typer.Argument(DEFAULT_SPEC, help="a shipped spec name or a path to a spec YAML with a search block"),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", help="finished trials per method (default: the spec's trials)"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna RDB URL (default: SQLite under the store)"),
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s", help="result store folder"),
    methods: Optional[str] = typer.Option(None, "--methods", "-m", help=f"tune {METHODS_HELP}"),
    method: Optional[list[str]] = METHOD_ALIAS,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="tuned spec to write (default: <store>/<spec>/tune/<spec>-tuned.yaml)"),
    plugin: Optional[list[str]] = PLUGIN_OPTION,
) -> None:
    """Tune each method's search space with Optuna on validation; write the best configs as a spec."""
    from fuselab.experiments.spec import load_spec
    from fuselab.experiments.tune import default_storage, tune_spec, write_tuned_spec

    sp = load_spec(spec, plugins=plugin or [])
    if not sp.search:
        raise ConfigError(f"spec '{sp.name}' has no search block; add e.g. search: {{train.lr: {{loguniform: [1.0e-4, 1.0e-2]}}}}")
    method = _method_names(methods, method, sp)
    url = storage or default_storage(store, sp.name)
    n = trials or sp.trials
    console.print(f"[bold]{sp.name}[/]: tuning {len(method or sp.methods)} methods, {n} trials each on validation "
                  f"(seed {sp.seeds[0]}), {sp.direction} val {sp.metric}; storage {url}")

    with RunProgress(n * len(method or sp.methods), label="trials") as progress:

        def on_trial(name: str, trial) -> None:
            value = "pruned" if trial.value is None else f"{trial.value * 100:.2f}"
            if progress.bar is not None:
                progress.print(f"  {name} trial {trial.number}: {value} {trial.params}")
            progress.advance(f"{name} trial {trial.number}", "pruned" if trial.value is None else "finished",
                             detail=(f"val {sp.metric} {value} %, " if trial.value is not None else "")
                             + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in trial.params.items()),
                             info=f"{name} trial {trial.number}: {value}")

        results = tune_spec(sp, trials=n, storage=url, store=store, methods=method or None, on_trial=on_trial)
    table = Table(title=f"best on validation ({sp.metric})")
    for col in ("method", "trials", "pruned", f"val {sp.metric}", "best values"):
        table.add_column(col)
    for r in results.values():
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items())
        table.add_row(r.method, str(r.trials), str(r.pruned), "–" if r.value != r.value else f"{r.value * 100:.2f}",
                      shown or "(nothing to tune)")
    console.print(table)
    path = out or Path(store) / sp.name / "tune" / f"{sp.name}-tuned.yaml"
    write_tuned_spec(sp, results, path)
    console.print(f"tuned spec: {path}\nrun it over seeds: fuselab compare {path} --store {store}")


@app.command("profile")
def profile_cmd(
    spec: str = typer.Argument(DEFAULT_SPEC, help="a shipped spec name or a path to a spec YAML"),
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s", help="result store folder (profile written there)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's)"),
    repeat: int = typer.Option(50, "--repeat", help="timed forward passes per batch size"),
    warmup: int = typer.Option(10, "--warmup", help="untimed forward passes first"),
    methods: Optional[str] = typer.Option(None, "--methods", "-m", help=f"profile {METHODS_HELP}"),
    method: Optional[list[str]] = METHOD_ALIAS,
    plugin: Optional[list[str]] = PLUGIN_OPTION,
) -> None:
    """Parameters, FLOPs per sample, latency (batch 1 and 64) and peak memory of each method of a spec."""
    from fuselab.experiments.profile import profile_spec, write_profile
    from fuselab.experiments.spec import load_spec

    from fuselab.experiments.store import Store

    sp = load_spec(spec, plugins=plugin or [])
    method = _method_names(methods, method, sp)
    Store(store).check_writable()  # before minutes of timing, not after
    from fuselab.experiments.profile import profile_dir

    profile_dir(store, sp.name).mkdir(parents=True, exist_ok=True)  # an unwritable store fails here, named
    if repeat < 1 or warmup < 0:
        raise ConfigError("--repeat must be at least 1 and --warmup at least 0")
    with RunProgress(len(method or sp.methods), label="profile") as progress:
        frame = profile_spec(sp, store=store, device=device, threads=threads, repeat=repeat, warmup=warmup,
                             methods=method or None,
                             on_method=lambda p: progress.advance(
                                 p.method, "profiled", detail=f"{p.params:,} params, {p.latency_b1_ms:.3f} ms at batch 1",
                                 info=p.method))
    files = write_profile(frame, store, sp.name)
    console.print(files["markdown"].read_text(), markup=False, highlight=False)
    console.print(f"profile: {files['csv']} (the comparison report of '{sp.name}' shows these columns)")


@app.command("report")
def report_cmd(
    experiment: str = typer.Argument(..., help="experiment name (the spec's name)"),
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s", help="result store folder"),
    html: bool = typer.Option(True, "--html/--no-html", help="write the self-contained report.html"),
    lang: str = typer.Option("en", "--lang", help="language of headings and captions: en | zh"),
    flops: bool = typer.Option(True, "--flops/--no-flops", help="count FLOPs per sample (cached in each run folder)"),
) -> None:
    """Write the tables (Markdown, LaTeX, CSV), plots (PNG, PDF), network figure (SVG, PDF) and HTML report."""
    from fuselab.report.i18n import check_lang

    _print_report(store, experiment, html=html, lang=check_lang(lang), pdf=True, flops=flops)


@app.command("robustness")
def robustness_cmd(
    experiment: str = typer.Argument(..., help="experiment name (the spec's name)"),
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s", help="result store folder"),
    corruptions: str = typer.Option("noise,drop,missing", "--corruptions", help="comma-separated: noise, drop, missing"),
    levels: str = typer.Option("0:1:0.1", "--levels", help="levels in [0, 1]: start:stop:step or a comma-separated list"),
    missing: str = typer.Option("auto", "--missing", help="a missing modality: auto (left out where the merge supports it, else zero input) | zeros (zero input) | features (zeroed stream, as modality dropout)"),
    noise_scale: float = typer.Option(1.0, "--noise-scale", help="noise std at level 1, in units of the modality's std"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto"),
    force: bool = typer.Option(False, "--force", help="evaluate again runs whose curves are up to date"),
) -> None:
    """Evaluate each run's best checkpoint with one modality corrupted at a time: curves, relative and
    effective robustness per method (written to the run folders and <store>/<experiment>/report/robustness.md)."""
    import numpy as np

    from fuselab.experiments.robustness import RobustnessSettings, run_robustness
    try:
        if ":" in levels:
            start, stop, step = (float(v) for v in levels.split(":"))
            grid = tuple(round(float(v), 6) for v in np.arange(start, stop + step / 2, step))
        else:
            grid = tuple(float(v) for v in levels.split(","))
    except ValueError:
        raise ConfigError(f"--levels '{levels}' must be start:stop:step or a comma-separated list of numbers") from None
    settings = RobustnessSettings(levels=grid, corruptions=tuple(c.strip() for c in corruptions.split(",") if c.strip()),
                                  missing=missing, noise_scale=noise_scale, device=device)
    from fuselab.experiments.store import Store

    st = Store(store)
    st.experiment(experiment)  # an unknown experiment or store: one line before anything starts
    total = sum(r["status"] == "done" for r in st.experiment_runs(experiment))
    words = {"done": "evaluated", "cached": "up to date", "failed": "failed"}
    with RunProgress(total, label="robustness") as progress:

        def on_run(run, status: str) -> None:
            progress.advance(f"{run['method']} seed {run['seed']}", words.get(status, status),
                             worked=status != "cached", info=f"{run['method']} seed {run['seed']}: {status}")

        result = run_robustness(store, experiment, settings, force=force, on_run=on_run)
    console.print(result.markdown, markup=False, highlight=False)
    for e in result.errors:
        console.print(f"[red]not evaluated[/]: {e['method']} (seed {e['seed']}): {e['error']}", highlight=False)
    console.print(f"{result.evaluated} runs evaluated, {result.cached} up to date; "
                  f"tables: {result.files['markdown']}, {result.files['csv']}; curves: runs/<id>/robustness.csv")


@app.command("evaluate")
def evaluate_cmd(
    target: str = typer.Argument(..., help="a run folder, or an experiment name in --store"),
    overrides: Optional[list[str]] = typer.Argument(None, help="data overrides, e.g. data.images=[a,b] data.change_mask=c.bmp"),
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s", help="result store folder (for an experiment)"),
    name: Optional[str] = typer.Option(None, "--name", help="name of this evaluation (default: made from the overrides)"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    trust: bool = typer.Option(False, "--trust", help="rebuild configs that name import paths (a store you trust)"),
) -> None:
    """Score a run, or every finished run of an experiment, on another data configuration (another scene,
    split or variant); recorded in each run folder as evaluations/<name>.json."""
    from fuselab.experiments.evaluate import evaluate_target

    result = evaluate_target(target, list(overrides or []), store=store, name=name, device=device, trust=trust)
    console.print(result.markdown, markup=False, highlight=False)
    for e in result.errors:
        console.print(f"[red]not evaluated[/]: {e['method']} (seed {e['seed']}): {e['error']}", highlight=False)
    where = f"; table: {result.files['markdown']}" if "markdown" in result.files else ""
    console.print(f"{len(result.rows)} run(s) evaluated as '{result.name}' (runs/<id>/evaluations/{result.name}.json){where}",
                  markup=False, highlight=False)


@app.command("predict")
def predict_cmd(
    run: Path = typer.Argument(..., help="a run folder"),
    overrides: Optional[list[str]] = typer.Argument(None, help="data overrides, e.g. data.images=[t1.tif,t2.tif]"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the predictions"),
    split: str = typer.Option("test", "--split", help="train | val | test (datasets of samples)"),
    fold: Optional[int] = typer.Option(None, "--fold", help="one fold's model (default: the fold ensemble)"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    trust: bool = typer.Option(False, "--trust", help="rebuild configs that name import paths (a store you trust)"),
) -> None:
    """Write a run's predictions: class probabilities per sample (CSV), or a scene's change map (PNG, and a
    GeoTIFF when the input is georeferenced)."""
    from fuselab.experiments.predict import describe, predict_run

    result = predict_run(run, out, list(overrides or []), split=split, fold=fold, device=device, trust=trust)
    for line in describe(result):
        console.print(line, markup=False, highlight=False)


SPEC_KEYS = ("base", "grid", "variants", "baseline", "seeds")  # top-level keys that make a YAML a spec


def _is_spec(arg: str) -> bool:
    """Does ``arg`` name a spec (a shipped name, or a YAML file with spec keys) rather than a run config?"""
    from fuselab.experiments.spec import shipped_specs
    from fuselab.train.config import read_yaml

    path = Path(arg)
    if not path.exists():
        return arg in shipped_specs()
    content = read_yaml(path)
    return isinstance(content, dict) and any(k in content for k in SPEC_KEYS)


@app.command("figure")
def figure_cmd(
    config: Optional[Path] = typer.Argument(None, help="a YAML run config, or a spec (name or YAML) with --method"),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted overrides, e.g. model.fuse_at=0 fusion.name=lmf"),
    out: Path = typer.Option(Path("network"), "--out", "-o", help="output path without suffix; .svg and .pdf are written"),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="with a spec: the method to draw (default: its baseline)"),
    plugin: Optional[list[str]] = PLUGIN_OPTION,
) -> None:
    """Draw the model a run config (or a spec's method) describes as a block diagram (SVG and PDF)."""
    from omegaconf import OmegaConf

    from fuselab.plugins import load_plugins
    from fuselab.report.figure import draw_config
    from fuselab.train.config import make_config, read_yaml

    load_plugins(plugin or [])
    items = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        items.insert(0, str(config))
        config = None
    if config is not None and _is_spec(str(config)):
        from fuselab.experiments.spec import load_spec

        sp = load_spec(str(config), plugins=plugin or [])
        name = method or sp.baseline
        known = [m.name for m in sp.methods]
        if name not in known:
            raise _unknown_method("--method", name, sp.name, known)
        base = OmegaConf.to_container(sp.config(name, sp.seeds[0]), resolve=True)
        cfg = make_config(base, items)
        console.print(f"{sp.name}: {name}", markup=False, highlight=False)
    elif method is not None:
        raise ConfigError(f"--method '{method}' needs a spec (a shipped name or a spec YAML), not a run config; "
                          "give the spec as the first argument")
    else:
        cfg = make_config(read_yaml(config) if config else None, items)
    stem = out.with_suffix("") if out.suffix in (".svg", ".pdf") else out
    paths = draw_config(cfg, stem)
    console.print(f"figure: {', '.join(str(p) for p in paths)}")


@app.command("journal")
def journal_cmd(
    since: str = typer.Option("7d", "--since", help="period: a duration (7d, 36h, 2w) or a start date (2026-11-20)"),
    lang: str = typer.Option("en", "--lang", help="language: en | zh"),
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s", help="result store folder"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Markdown file to write (default: <store>/journal/<date>.<lang>.md)"),
) -> None:
    """The weekly journal: per experiment, what was tried in the period and how it compared with the baseline."""
    import datetime

    from fuselab.report.i18n import check_lang
    from fuselab.report.journal import build_journal

    markdown = build_journal(store, since=since, lang=check_lang(lang))
    path = out or store / "journal" / f"{datetime.date.today().isoformat()}.{lang}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown, encoding="utf-8")
    console.print(markdown, markup=False, highlight=False)
    console.print(f"journal: {path}")


runs_app = typer.Typer(help="List, delete or retry runs in a store.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

_RUN_FILTERS = {
    "experiment": typer.Option(None, "--experiment", "-e", help="only runs of this experiment"),
    "status": typer.Option(None, "--status", help="pending | running | done | failed | interrupted | missing"),
    "prefix": typer.Option(None, "--id", help="run id prefix"),
}


def _select(store: Path, experiment, status, prefix):
    from fuselab.experiments.store import Store
    from fuselab.experiments.store import MISSING, STATUSES

    if status is not None and status not in (*STATUSES, MISSING):
        raise ConfigError(f"--status must be pending, running, done or failed (or interrupted, or {MISSING}: "
                          f"done but its folder is gone), got '{status}'")
    st = Store(store)
    return st, st.select_runs(experiment=experiment, status=status, prefix=prefix)


@runs_app.command("list")
def runs_list(
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s"),
    experiment: Optional[str] = _RUN_FILTERS["experiment"],
    status: Optional[str] = _RUN_FILTERS["status"],
    prefix: Optional[str] = _RUN_FILTERS["prefix"],
) -> None:
    """List runs with their status, experiments and test accuracy."""
    _, runs = _select(store, experiment, status, prefix)
    if _plain_output():  # whole ids, one run a line, tab-separated
        _print_row("id", "status", "attempts", "experiment: method / seed", "test acc", "error")
        for r in runs:
            members = ", ".join(f"{e}: {m} / {s}" for e, m, s in r["members"])
            acc = f"{r['metrics']['test_accuracy'] * 100:.2f}" if r["metrics"] and "test_accuracy" in r["metrics"] else ""
            error = (r["error"] or "").splitlines()[0] if r["error"] else ""
            _print_row(r["run_id"], r["status"], str(r["attempts"]), members, acc, error)
        return
    table = Table(title=f"{len(runs)} runs in {store}")
    for col in ("id", "status", "attempts", "experiment: method / seed", "test acc", "error"):
        table.add_column(col)
    for r in runs:
        members = ", ".join(f"{e}: {m} / {s}" for e, m, s in r["members"])
        acc = f"{r['metrics']['test_accuracy'] * 100:.2f}" if r["metrics"] and "test_accuracy" in r["metrics"] else ""
        table.add_row(r["run_id"], r["status"], str(r["attempts"]), members, acc, r["error"] or "")
    console.print(table)


def _change_runs(action: str, store: Path, experiment, status, prefix, yes: bool) -> None:
    st, runs = _select(store, experiment, status, prefix)
    busy = [r for r in runs if st.busy(r)]
    runs = [r for r in runs if not st.busy(r)]
    if busy:
        console.print(f"{len(busy)} runs are being trained by a live process and are left alone")
    if not runs:
        console.print("no runs match")
        return
    if not yes:
        typer.confirm(f"{action} {len(runs)} runs?", abort=True)
    ids = [r["run_id"] for r in runs]
    (st.delete_runs if action == "delete" else st.reset_runs)(ids)
    what = "deleted" if action == "delete" else "reset to pending (the next `fuselab compare` trains them)"
    console.print(f"{len(ids)} runs {what}")


@runs_app.command("delete")
def runs_delete(
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s"),
    experiment: Optional[str] = _RUN_FILTERS["experiment"],
    status: Optional[str] = _RUN_FILTERS["status"],
    prefix: Optional[str] = _RUN_FILTERS["prefix"],
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
) -> None:
    """Delete runs (rows and folders) from a store."""
    _change_runs("delete", store, experiment, status, prefix, yes)


@runs_app.command("retry")
def runs_retry(
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s"),
    experiment: Optional[str] = _RUN_FILTERS["experiment"],
    status: Optional[str] = typer.Option("failed", "--status", help="which runs to retry (default: failed)"),
    prefix: Optional[str] = _RUN_FILTERS["prefix"],
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
) -> None:
    """Reset runs to pending so that the next `fuselab compare` trains them again."""
    _change_runs("retry", store, experiment, status, prefix, yes)


def _store_argument(argv: list[str]) -> str | None:
    """The value of ``--store`` / ``-s`` in a command line, if given."""
    for i, arg in enumerate(argv):
        if arg in ("--store", "-s") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--store="):
            return arg.split("=", 1)[1]
    return None


def _inside(path: str | Path, folder: str | Path) -> bool:
    """Is ``path`` the folder or below it (compared as absolute paths)?"""
    import os

    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    try:
        from fuselab.plugins import load_entry_points

        load_entry_points()
        app(args=argv, prog_name="fuselab")
    except (KeyboardInterrupt, SweepInterrupted):  # Ctrl-C or SIGTERM: the runs in progress are marked interrupted
        errors.print("interrupted: runs in progress are marked interrupted; run the same command again to resume them",
                     markup=False, highlight=False)
        sys.exit(130)
    except (ConfigError, ValueError, KeyError, OSError) as exc:
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        store = _store_argument(sys.argv[1:] if argv is None else argv)
        if isinstance(exc, OSError) and exc.filename and store is not None and _inside(exc.filename, store):
            message = (f"store '{store}' cannot be written ({exc.strerror or type(exc).__name__}: '{exc.filename}'); "
                       "pick another --store")
        elif isinstance(exc, PermissionError) and exc.filename:
            message = f"permission denied: '{exc.filename}'; pick a folder you can write (e.g. --store or --out)"
        elif isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.filename:
            message = f"cannot write '{exc.filename}' ({exc.strerror or type(exc).__name__}); pick another folder"
        elif isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise
        from rich.markup import escape  # a message's own brackets (pip install 'fuselab[mlflow]') are text

        errors.print(f"[bold red]error:[/] {escape(message.splitlines()[0]) if message else type(exc).__name__}",
                     markup=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
