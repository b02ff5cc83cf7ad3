"""Ray backend: each run is a Ray task with its own resources; results land in the driver's store.

The driver claims each run in its store before submitting it (so resume and claiming behave exactly as
with local processes), a task trains into a temporary folder on whichever node runs it and sends the whole
run folder back, and the driver publishes it. Nothing but the task's arguments and its returned folder
crosses the network, so workers need no access to the store. Plugins given by path must exist at the same
path on every node (a shared file system or an installed package).

    fuselab compare SPEC --backend ray                      # a local Ray instance on this machine
    fuselab compare SPEC --backend ray --address auto       # the cluster this machine belongs to
    fuselab compare SPEC --backend ray --address ray://head:10001 --gpus-per-run 1

A local instance (no ``--address``) is started with Ray's token authentication switched on
(``RAY_AUTH_MODE=token``, even where it was switched off), so that nobody without this user's token can submit
work to it. It cannot be kept off the network: Ray 2.60 resolves a loopback node address to the machine's
address and binds its GCS and raylet servers to every interface (see docs/scale.md). The driver keeps each run's claim alive while its task runs and publishes a result only while it still
holds the claim.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fuselab.experiments.store import Store


def train_remote(config: dict[str, Any], threads: int, plugins: tuple[str, ...]) -> tuple[str, Any, bytes | None]:
    """Runs on a Ray worker: train one run into a temporary folder and return it as a gzipped tar."""
    import torch

    from fuselab.plugins import load_plugins
    from fuselab.train.config import make_config
    from fuselab.train.run import execute

    torch.set_num_threads(threads)
    try:
        load_plugins(plugins)
        cfg = make_config(config, [f"train.threads={threads}"])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "run"
            result = execute(cfg, folder)
            from fuselab.train.flops import record_flops

            result.metrics["flops"] = record_flops(cfg, folder)  # as local runs record it
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
                tar.add(folder, arcname=".")
        return "done", result.metrics, buffer.getvalue()
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which records it
        first = str(exc).splitlines()[0] if str(exc) else ""
        return "failed", f"{type(exc).__name__}: {first}\n{traceback.format_exc()}", None


def run_tasks(
    tasks: list[tuple[str, str, int, dict[str, Any]]],
    store: Store,
    report: Callable[..., None],
    *,
    address: str | None,
    threads: int,
    gpus_per_run: float,
    plugins: tuple[str, ...],
    cpus: int,
) -> None:
    """Train ``(run id, method, seed, config)`` tasks on Ray; ``report(run_id, method, seed, status, metrics, error)``."""
    import os

    if not address:  # before Ray reads its configuration: a local instance always requires the user's token
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        from fuselab.errors import ConfigError

        raise ConfigError("--backend ray needs Ray: pip install 'fuselab[ray]'") from None
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:  # Ray binds to every interface: only a caller with this user's token may submit work
            try:  # Ray imported earlier in this process cached its configuration: read it again
                from ray._raylet import Config

                Config.initialize("")
            except (ImportError, AttributeError):
                pass
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=threads, num_gpus=gpus_per_run, max_retries=0)(train_remote)
        pending: dict[Any, tuple[str, str, int, str]] = {}
        for run_id, method, seed, config in tasks:
            claim = store.claim(run_id)
            if claim is None:
                report(run_id, method, seed, "skipped", None, None)
                continue
            pending[remote.remote(config, threads, plugins)] = (run_id, method, seed, claim)
        last_beat = time.monotonic()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=10.0)
                if time.monotonic() - last_beat > 30.0:
                    for run_id, _, _, claim in pending.values():
                        store.heartbeat(run_id, claim)
                    last_beat = time.monotonic()
                for ref in ready:
                    run_id, method, seed, claim = pending.pop(ref)
                    try:
                        status, payload, blob = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a lost worker or node is a failed run
                        status, payload, blob = "failed", f"{type(exc).__name__}: {exc}", None
                    if status == "done":
                        staging = store.staging_dir(run_id, claim)
                        staging.mkdir(parents=True, exist_ok=True)
                        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
                            tar.extractall(staging, filter="data")
                        if store.finish(run_id, payload, claim, staging):
                            report(run_id, method, seed, "done", payload, None)
                        else:  # taken over meanwhile: the new owner's result counts
                            shutil.rmtree(staging, ignore_errors=True)
                            report(run_id, method, seed, "skipped", None, None)
                    elif store.fail(run_id, payload, claim):
                        report(run_id, method, seed, "failed", None, payload.splitlines()[0])
                    else:
                        report(run_id, method, seed, "skipped", None, None)
        except BaseException:  # Ctrl-C: the runs still out are marked interrupted
            for ref, (run_id, _, _, claim) in pending.items():
                ray.cancel(ref, force=True)
                store.fail(run_id, "interrupted", claim, status="interrupted")
            raise
    finally:
        if started:
            ray.shutdown()
