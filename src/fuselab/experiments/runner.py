"""Execute an experiment's plan: skip finished runs, retry failed ones, run the rest in local processes.

Each run is claimed in the store before it trains, so concurrent sweeps on one store and re-runs after an
interruption never train a run twice; a background thread keeps the claim's heartbeat fresh however long an
epoch takes, and a run whose claim was taken over stops and publishes nothing. With ``jobs > 1`` runs train
in ``jobs`` worker processes that live across runs, one run at a time each: a worker that dies (kill -9, the
OOM killer) is the failure of the run it was training, retried once from its last saved state in a new
worker, and the other runs go on. Workers exit when the sweep's process dies.
Ctrl-C (or SIGTERM) stops the workers and marks their runs ``interrupted``; the next sweep resumes them.
A failing run is recorded with its error and the sweep goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fuselab.experiments.spec import PlannedRun, Spec
from fuselab.experiments.store import Store

HEARTBEAT_SECONDS = 30.0  # well under Store.stale_seconds (600 s by default)
DEATH_RETRIES = 1  # a run whose worker died is trained again this many times in the same sweep


@dataclasses.dataclass
class Outcome:
    run_id: str
    method: str
    seed: int
    status: str  # done | failed | skipped (held by another live process) | cached (already done)
    metrics: dict[str, Any] | None = None
    error: str | None = None


class ClaimLost(Exception):
    """Another process took this run over (our heartbeat had gone stale): stop, publish nothing."""


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class _Heartbeat:
    """Refreshes a claim every ``interval`` seconds from a thread, independent of epoch length; sets
    ``lost`` when the claim is no longer ours."""

    def __init__(self, store: Store, run_id: str, claim: str, interval: float | None = None) -> None:
        if interval is None:  # a few beats per staleness limit, however short it is set
            interval = min(HEARTBEAT_SECONDS, max(1.0, store.stale_seconds / 4))
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._args = (store, run_id, claim, interval)
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        store, run_id, claim, interval = self._args
        while not self._stop.wait(interval):
            try:
                if not store.heartbeat(run_id, claim):
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 - a busy database: try again at the next beat
                continue

    def stop(self) -> None:
        self._stop.set()


def train_one(store_root: str, run_id: str, method: str, seed: int, config: dict[str, Any], threads: int,
              plugins: tuple[str, ...] = ()) -> Outcome:
    """Claim, train and publish one run (in-process)."""
    store = Store(store_root)
    claim = store.claim(run_id)
    if claim is None:
        return Outcome(run_id, method, seed, "cached" if store.status(run_id) == "done" else "skipped")
    return train_claimed(store_root, run_id, claim, method, seed, config, threads, plugins)


def train_claimed(store_root: str, run_id: str, claim: str, method: str, seed: int, config: dict[str, Any],
                  threads: int, plugins: tuple[str, ...] = ()) -> Outcome:
    """Train and publish a run this sweep has claimed (``claim`` from ``Store.claim``), in its own partial
    folder seeded with the state an earlier attempt saved."""
    from fuselab.plugins import load_plugins
    from fuselab.train.config import make_config
    from fuselab.train.flops import record_flops
    from fuselab.train.run import execute  # imported in the worker

    store = Store(store_root)
    staging: Path | None = None
    beat = _Heartbeat(store, run_id, claim)
    try:
        load_plugins(plugins)  # a worker process starts with the built-ins only
        explicit = (config.get("train") or {}).get("threads")  # a spec's or the command line's train.threads is kept
        cfg = make_config(config, [] if explicit else [f"train.threads={threads}"])
        staging = store.start_attempt(run_id, claim)
        _drop_unsafe_states(staging)
        earlier_logs = _read_log_rows(staging)
        epochs: list[int] = []

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            epochs.append(epoch)
            if beat.lost.is_set():
                raise ClaimLost(run_id)

        started = time.time()
        result = execute(cfg, staging, on_epoch=on_epoch, resumable=True)
        if beat.lost.is_set():
            raise ClaimLost(run_id)
        result.metrics["flops"] = record_flops(cfg, staging)
        _keep_earlier_logs(staging, earlier_logs)
        _record_attempt(staging, claim, started, epochs)
        if not store.finish(run_id, result.metrics, claim, staging):
            raise ClaimLost(run_id)
        return Outcome(run_id, method, seed, "done", metrics=result.metrics)
    except ClaimLost:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        return Outcome(run_id, method, seed, "skipped")  # the new owner's result is reported when it is done
    except KeyboardInterrupt:  # the saved state stays in the partial folder: the next sweep resumes it
        store.fail(run_id, "interrupted", claim, status="interrupted")
        raise
    except Exception as exc:  # noqa: BLE001 - a failing run is recorded and the sweep goes on
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ours = store.fail(run_id, message + "\n" + traceback.format_exc(), claim)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)  # a retry starts afresh
        if not ours:  # taken over meanwhile (its folder removed under us): the new owner's result counts
            return Outcome(run_id, method, seed, "skipped")
        return Outcome(run_id, method, seed, "failed", error=message)
    finally:
        beat.stop()


def _drop_unsafe_states(folder: Path) -> list[str]:
    """Remove saved training states that do not load as plain tensors and types (a damaged file, or a
    pickle planted in a shared store): the run then trains from the start instead of failing, and no
    code in them ever runs. Returns the names of the removed files."""
    import pickle

    import torch

    dropped = []
    for state in sorted([*folder.glob("resume*.pt"), *folder.glob("finished-fold*.pt")]):
        try:
            torch.load(state, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError):
            state.unlink(missing_ok=True)
            dropped.append(state.name)
    if dropped:
        (folder / "dropped-states.txt").write_text(
            "saved states that were not plain tensors and types, removed unread:\n" + "\n".join(dropped) + "\n")
    return dropped


def _read_log_rows(folder: Path) -> list[dict[str, Any]]:
    """The CSV log rows of the epochs an earlier attempt trained: from its saved state's history (the
    logger buffers rows in memory, so a killed process may not have written them), else from its log file
    (the logger starts a new file when it is created)."""
    import torch

    state = folder / "resume.pt"
    if state.is_file():
        try:
            history = torch.load(state, map_location="cpu", weights_only=True)["history"]
            return [{**{k: v for k, v in row.items() if k != "epoch"}, "step": row["epoch"]} for row in history]
        except Exception:  # noqa: BLE001 - fall back to the log file
            pass
    file = folder / "logs" / "metrics.csv"
    if not file.is_file():
        return []
    with file.open(newline="") as f:
        return list(csv.DictReader(f))


def _keep_earlier_logs(folder: Path, earlier: list[dict[str, Any]]) -> None:
    """Put back the log rows of the epochs trained before a resume, ahead of this attempt's rows."""
    file = folder / "logs" / "metrics.csv"
    if not earlier or not file.is_file():
        return
    with file.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    first = min((int(float(r["step"])) for r in rows if r.get("step")), default=None)
    kept = [r for r in earlier if r.get("step") not in (None, "") and (first is None or int(float(r["step"])) < first)]
    for key in (k for r in kept for k in r):
        if key not in fields:
            fields.append(key)
    tmp = file.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept + rows)
    os.replace(tmp, file)


def _record_attempt(folder: Path, claim: str, started: float, epochs: list[int]) -> None:
    """Append this attempt to ``attempts.json``: which epochs it trained (a resumed attempt starts after
    the epochs its saved state covered) and in which process (``pid``)."""
    file = folder / "attempts.json"
    attempts = json.loads(file.read_text()) if file.is_file() else []
    attempts.append({"owner": claim, "pid": os.getpid(), "started": started, "finished": time.time(),
                     "first_epoch": epochs[0] if epochs else None, "epochs_trained": len(epochs)})
    file.write_text(json.dumps(attempts, indent=2))


def prepare(spec: Spec, store: Store, *, on_trial: Callable[[str, Any], None] | None = None) -> list[PlannedRun]:
    """Check everything, then record the plan in the store (nothing is written when a check fails).

    Under ``budget: equal-trials`` each method is first tuned on validation with ``spec.trials`` trials
    (Optuna, SQLite under ``<store>/<experiment>/tune/``; resumed if interrupted) and its runs carry the best
    values found."""
    store.check_writable()
    plan = spec.plan()
    if spec.budget == "equal-trials":
        from fuselab.experiments.tune import apply_equal_trials

        apply_equal_trials(spec, store.root, on_trial=on_trial)
        plan = spec.plan()
    store.init()
    store.register_experiment(
        spec.name, spec.source, spec.baseline, spec.metric,
        [(r.run_id, r.method, r.seed, OmegaConf.to_container(r.config, resolve=True)) for r in plan],
    )
    return plan


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _exit_with_parent(parent: int) -> None:
    """Make this worker die with the sweep's process: the kernel's parent-death signal where there is one
    (Linux), and a watchdog thread everywhere."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(70)
            time.sleep(1.0)

    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(70)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker_loop(parent: int, threads: int, conn: Any) -> None:
    """A worker process that lives across runs: imports, the thread setup and the dataset cache are paid
    once. It trains one claimed run at a time, as it receives them through ``conn``, and sends each
    outcome back; ``None`` (or the sweep's end of the pipe closing) ends it."""
    _exit_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the sweep, which stops us
    _init_worker(threads)
    import fuselab.train.run  # noqa: F401  (the training code, imported while the sweep is still planning)

    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            task = None
        if task is None:  # every run's files and store rows are written before its outcome is sent:
            sys.stdout.flush()  # nothing is left to tear down, so skip the interpreter's slow shutdown
            sys.stderr.flush()
            os._exit(0)
        claim, (store_root, run_id, method, seed, config, threads, plugins) = task
        outcome = train_claimed(store_root, run_id, claim, method, seed, config, threads, plugins)
        conn.send(dataclasses.asdict(outcome))


class _Worker:
    """The sweep's handle on one worker process: its pipe and the run it is training (``task``)."""

    def __init__(self, context: Any, threads: int) -> None:
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_loop, args=(os.getpid(), threads, child), daemon=False)
        self.process.start()
        child.close()
        self.task: tuple[tuple[Any, ...], str] | None = None  # (run args, claim)
        self.runs = 0

    def assign(self, args: tuple[Any, ...], claim: str) -> None:
        self.task = (args, claim)
        self.runs += 1
        self.conn.send((claim, args))

    def ask_to_stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass

    def outcome(self) -> Outcome | None:
        """The outcome of the current run if the worker sent one (it may have died instead)."""
        try:
            if self.conn.poll():
                return Outcome(**self.conn.recv())
        except (EOFError, OSError):
            pass
        return None

    def stop(self, timeout: float = 5.0) -> None:
        self.ask_to_stop()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory? the OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"WorkerDied: the worker process was killed by {name}{hint}"
    return f"WorkerDied: the worker process exited with code {exitcode} before reporting"


def worker_threads(jobs: int) -> int:
    """Torch threads per run when ``jobs`` runs share this machine's cores."""
    return max(1, default_jobs() // max(1, jobs))


class WorkerPool:
    """Sweep workers started before the plan is ready: their start-up (interpreter, imports of the training
    code, thread setup) overlaps with the caller's planning instead of following it. ``execute_plan(...,
    pool=)`` hands runs to them; workers it did not use are stopped by ``close`` (or leaving the ``with``)."""

    def __init__(self, jobs: int) -> None:
        self.threads = worker_threads(jobs)
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        self.workers = [_Worker(context, self.threads) for _ in range(jobs)]

    def take(self) -> list[_Worker]:
        """The started workers, now the caller's to stop."""
        workers, self.workers = self.workers, []
        return workers

    def close(self) -> None:
        workers = self.take()
        for worker in workers:  # possibly still importing: no need to wait for that
            worker.process.terminate()
        for worker in workers:
            worker.process.join()
            worker.conn.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop_all(workers: list[_Worker], timeout: float = 5.0) -> None:
    """Stop idle workers together: each is told first, then each is waited for."""
    for worker in workers:
        worker.ask_to_stop()
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.stop(max(0.1, deadline - time.monotonic()))


def _run_processes(args: list[tuple[Any, ...]], store: Store, jobs: int,
                   report: Callable[[Outcome], None], retries: int = DEATH_RETRIES,
                   runs_per_worker: int | None = None, started: list[_Worker] | None = None) -> None:
    """Train the runs in ``jobs`` worker processes that live across runs (a worker's start-up is paid once
    per sweep, not per run; ``runs_per_worker`` retires a worker after that many runs, 1 = a fresh process
    per run). A run is claimed here and handed to an idle worker; a worker that dies costs only the run it
    was training, which is retried (from the state it saved) in a new worker. ``started``: workers already
    started (a ``WorkerPool``'s), used first."""
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    threads = int(args[0][5]) if args else 1
    queue = list(args)
    deaths: dict[str, int] = {}
    idle: list[_Worker] = list(started or [])
    busy: list[_Worker] = []
    try:
        while queue or busy:
            while queue and len(busy) < jobs:
                a = queue.pop(0)
                claim = store.claim(a[1])
                if claim is None:
                    report(Outcome(a[1], a[2], a[3], "cached" if store.status(a[1]) == "done" else "skipped"))
                    continue
                worker = idle.pop() if idle else _Worker(context, threads)
                try:
                    worker.assign(a, claim)
                except (OSError, ValueError):  # it died while idle: a new one takes the run
                    worker.stop(0.1)
                    worker = _Worker(context, threads)
                    worker.assign(a, claim)
                busy.append(worker)
            if not busy:
                continue
            ready = set(multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in [w for w in busy if w.conn in ready or w.process.sentinel in ready]:
                busy.remove(worker)
                (a, claim), worker.task = worker.task, None
                outcome = worker.outcome()
                if outcome is not None:
                    report(outcome)
                    if worker.process.is_alive() and (runs_per_worker is None or worker.runs < runs_per_worker):
                        idle.append(worker)
                    else:
                        worker.stop(0.1)
                    continue
                worker.process.join()
                error = _death(worker.process.exitcode)
                worker.stop(0.1)
                store.fail(a[1], error, claim)
                deaths[a[1]] = deaths.get(a[1], 0) + 1
                if deaths[a[1]] <= retries:
                    queue.insert(0, a)  # again, from the state the dead worker saved
                else:
                    report(Outcome(a[1], a[2], a[3], "failed", error=error))
    except BaseException:  # Ctrl-C, SIGTERM: stop the workers, mark their runs interrupted
        for worker in busy + idle:
            worker.process.terminate()
        deadline = time.monotonic() + 5.0
        for worker in busy + idle:
            worker.process.join(max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        for worker in busy:
            worker.conn.close()
            if worker.task is not None:
                a, claim = worker.task
                store.fail(a[1], "interrupted", claim, status="interrupted")
        raise
    _stop_all(idle)


def execute_plan(
    plan: list[PlannedRun],
    store: Store,
    *,
    jobs: int,
    on_outcome: Callable[[Outcome], None] | None = None,
    plugins: list[str] | tuple[str, ...] = (),
    wait: bool = True,
    poll_seconds: float = 2.0,
    backend: str = "local",
    address: str | None = None,
    gpus_per_run: float = 0.0,
    runs_per_worker: int | None = None,
    pool: WorkerPool | None = None,
) -> list[Outcome]:
    """Train every run of ``plan`` that is not done; ``jobs`` processes, torch threads split between them.

    A run that another live process is training (a concurrent sweep, or one that took it over) is waited
    for and then reported from the store, or trained here if its owner dies (``wait=False`` reports it as
    ``skipped`` instead). A done run whose folder is gone (``missing``) is reported as such and not trained
    (``fuselab runs retry --status missing`` sends it back). ``runs_per_worker`` retires a worker process
    after that many runs (default: workers live for the whole sweep; 1 gives every run a fresh process).
    ``pool``: workers started earlier (``WorkerPool(jobs)``), used for the local processes; the caller
    closes the pool, which stops any worker this sweep did not need.
    """
    outcomes: list[Outcome] = []
    held: list[Outcome] = []

    def report(outcome: Outcome) -> None:
        if outcome.status == "skipped" and wait:
            held.append(outcome)
            return
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)

    seen: set[str] = set()
    todo: list[PlannedRun] = []
    for run in plan:
        if run.run_id in seen:
            continue
        seen.add(run.run_id)
        status = store.status(run.run_id)
        if status in ("done", "missing"):
            report(Outcome(run.run_id, run.method, run.seed, "cached" if status == "done" else "missing"))
        else:
            todo.append(run)
    threads = worker_threads(jobs)
    args = {r.run_id: (str(store.root), r.run_id, r.method, r.seed, OmegaConf.to_container(r.config, resolve=True),
                       threads, tuple(plugins)) for r in todo}
    if backend == "ray" and args:
        from fuselab.experiments.ray_backend import run_tasks

        run_tasks(
            [(a[1], a[2], a[3], a[4]) for a in args.values()], store,
            lambda rid, method, seed, status, metrics, error: report(Outcome(rid, method, seed, status, metrics, error)),
            address=address, threads=threads, gpus_per_run=gpus_per_run, plugins=tuple(plugins), cpus=default_jobs(),
        )
    elif jobs <= 1 or len(todo) <= 1:
        import torch

        before = torch.get_num_threads()  # in this process: the caller's thread count is given back afterwards
        _init_worker(threads)
        try:
            for a in args.values():
                report(train_one(*a))
        finally:
            torch.set_num_threads(before)
    else:
        started = pool.take() if pool is not None and pool.threads == threads else []
        _run_processes(list(args.values()), store, jobs, report, runs_per_worker=runs_per_worker, started=started)
    while held:
        time.sleep(poll_seconds)
        waiting, held[:] = list(held), []
        for outcome in waiting:
            if store.status(outcome.run_id) == "done":
                report(dataclasses.replace(outcome, status="cached"))
            else:
                report(train_one(*args[outcome.run_id]))  # trains it if the owner is gone, else held again
    return outcomes


def evaluate_plan(spec: Spec, store: Store, plan: list[PlannedRun], *,
                  on_run: Callable[[PlannedRun, str, str], None] | None = None) -> dict[str, int]:
    """After training: score every done run of ``plan`` on each named set of the spec's ``evaluate:`` section
    (``fuselab.experiments.evaluate``), leaving alone the sets a run already has an evaluation of. Returns
    how many evaluations ran per set name."""
    if not spec.evaluate:
        return {}
    from fuselab.experiments.evaluate import evaluate_runs

    by_id = {r.run_id: r for r in plan}
    runs = [{"run_id": r.run_id, "method": r.method, "seed": r.seed, "dir": store.run_dir(r.run_id)}
            for r in by_id.values() if store.status(r.run_id) == "done"]
    done = evaluate_runs(runs, spec.evaluate,
                         on_run=(lambda run, name, status: on_run(by_id[run["run_id"]], name, status)) if on_run else None)
    return {name: len(rows) for name, rows in done.items()}
