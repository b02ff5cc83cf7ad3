"""The ``fuselab`` command: list, run, compare, report."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="fuselab: multimodal-fusion operators, models and fair comparisons.",
)
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)

DEFAULT_STORE = Path("runs")
DEFAULT_SPEC = "mfeat-compare"


@app.command("list")
def list_cmd(
    what: str = typer.Argument("fusions", help="fusions | models | datasets | losses | specs"),
    pattern: str = typer.Option("*", "--pattern", "-p", help="shell-style filter on ids"),
) -> None:
    """List registered fusions, models, datasets, loss terms or shipped specs."""
    import fuselab.train.config  # noqa: F401  (registers everything)
    from fuselab.api import fusion_info
    from fuselab.experiments.spec import shipped_specs
    from fuselab.registry import DATASETS, FUSIONS, LOSSES, MODELS
    from fuselab.train.config import ConfigError

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
            console.print(i)
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
) -> None:
    """Train one model from a config and print its test metrics."""
    from fuselab.experiments.spec import run_id
    from fuselab.train.config import make_config, read_yaml
    from fuselab.train.run import execute

    items = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        items.insert(0, str(config))
        config = None
    cfg = make_config(read_yaml(config) if config else None, items)
    run_dir = out / run_id(cfg)
    epochs = int(cfg.train.epochs)
    console.print(f"[bold]run[/] {cfg.fusion.name} on {cfg.data.name} with {cfg.model.name}, seed {cfg.seed} -> {run_dir}")
    with Progress(TextColumn("epoch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("train", total=epochs, info="")

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            progress.update(task, completed=epoch + 1,
                            info=f"loss {row['train_loss']:.3f}  val acc {row['val_accuracy'] * 100:.2f}")

        result = execute(cfg, run_dir, on_epoch=on_epoch)
        progress.update(task, total=len(result.history), completed=len(result.history))
    m = result.metrics
    console.print(
        f"test accuracy [bold]{m['test_accuracy'] * 100:.2f} %[/], macro-F1 {m['test_macro_f1'] * 100:.2f} %, "
        f"best epoch {m['best_epoch']}, {m['params']:,} parameters, {m['seconds']:.1f} s"
    )


@app.command("compare")
def compare_cmd(
    spec: str = typer.Argument(DEFAULT_SPEC, help="a shipped spec name or a path to a spec YAML"),
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s", help="result store folder"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="parallel runs (default: number of cores)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and an estimate, train nothing"),
) -> None:
    """Run every method x seed of a spec (skipping finished runs) and print the comparison table."""
    from fuselab.experiments.runner import default_jobs, execute_plan, prepare
    from fuselab.experiments.spec import load_spec
    from fuselab.experiments.store import Store

    sp = load_spec(spec)
    st = Store(store)
    jobs = jobs or default_jobs()
    if jobs < 1:
        from fuselab.train.config import ConfigError

        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if dry_run:
        _print_plan(sp, st, jobs)
        return
    plan = prepare(sp, st)
    unique = {r.run_id for r in plan}
    console.print(f"[bold]{sp.name}[/]: {len(sp.methods)} methods x {len(sp.seeds)} seeds = {len(unique)} runs, "
                  f"{jobs} jobs, store {st.root}")
    start = time.perf_counter()
    counts = {"done": 0, "cached": 0, "failed": 0, "skipped": 0}
    best: dict[str, list[float]] = {}
    with Progress(TextColumn("[bold]runs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("runs", total=len(unique), info="")

        def on_outcome(o) -> None:
            counts[o.status] = counts.get(o.status, 0) + 1
            if o.metrics:
                best.setdefault(o.method, []).append(o.metrics[f"test_{sp.metric}"])
            lead = max(best.items(), key=lambda kv: sum(kv[1]) / len(kv[1]), default=None)
            lead_text = f"best so far {lead[0]} {sum(lead[1]) / len(lead[1]) * 100:.2f}" if lead else ""
            progress.update(task, advance=1, info=f"trained {counts['done']}, cached {counts['cached']}, "
                                                 f"failed {counts['failed']}  {lead_text}")
            if o.status == "failed":
                progress.console.print(f"[red]failed[/] {o.method} seed {o.seed}: {o.error}")

        execute_plan(plan, st, jobs=jobs, on_outcome=on_outcome)
    console.print(f"{counts['done']} trained, {counts['cached']} already in the store, {counts['failed']} failed, "
                  f"{time.perf_counter() - start:.0f} s")
    _print_report(st.root, sp.name)


def _print_plan(sp, st, jobs: int) -> None:
    from fuselab.train.run import build_data

    plan = sp.plan()
    done = set()
    if st.exists():
        import sqlite3

        with st.connect() as conn:
            try:
                done = {r[0] for r in conn.execute("SELECT id FROM runs WHERE status='done'")}
            except sqlite3.Error:
                done = set()
    table = Table(title=f"plan of {sp.name} (baseline: {sp.baseline})")
    for col in ("method", "seeds", "to train"):
        table.add_column(col)
    for method in sp.methods:
        runs = [r for r in plan if r.method == method.name]
        table.add_row(method.name, ", ".join(str(r.seed) for r in runs), str(sum(r.run_id not in done for r in runs)))
    console.print(table)
    todo = {r.run_id: r for r in plan if r.run_id not in done}
    seconds = 0.0
    if todo:
        sample = next(iter(todo.values())).config
        n_train = len(build_data(sample).train)
        steps = sum(int(r.config.train.epochs) * -(-n_train // int(r.config.train.batch_size)) for r in todo.values())
        seconds = steps * 0.008 / max(1, min(jobs, len(todo)))  # about 8 ms per step of a small model per core here
    console.print(f"{len(todo)} of {len(set(r.run_id for r in plan))} runs to train with {jobs} jobs; "
                  f"rough estimate {seconds / 60:.1f} min (at most; early stopping shortens runs)")


def _print_report(store: Path, experiment: str) -> None:
    from fuselab.report.experiment import build_report

    report = build_report(store, experiment)
    console.print(report.markdown, markup=False, highlight=False)
    if report.failed:
        console.print(f"[red]{report.failed} runs failed[/]; `fuselab compare` again retries them")
    console.print(f"tables: {', '.join(str(p) for p in report.files.values())}")


@app.command("report")
def report_cmd(
    experiment: str = typer.Argument(..., help="experiment name (the spec's name)"),
    store: Path = typer.Option(DEFAULT_STORE, "--store", "-s", help="result store folder"),
) -> None:
    """Print and write the comparison table of an experiment from the store."""
    _print_report(store, experiment)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    from fuselab.train.config import ConfigError

    try:
        app(args=argv, prog_name="fuselab")
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        errors.print(f"[bold red]error:[/] {message.splitlines()[0] if message else type(exc).__name__}",
                     markup=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
