"""The result store: SQLite for the run table, a folder per run for its files.

Layout of a store folder::

    fuselab.sqlite          runs, experiments, which runs belong to which experiment
    runs/<run id>/          config.yaml, metrics.json, history.csv, predictions.npz, checkpoint.pt, logs/
    <experiment>/report/    tables written by ``fuselab report``

A run is *claimed* in one transaction before it trains, so that neither an interrupted sweep nor two
sweeps on the same store train it twice. A claim whose process is gone (same host) or whose heartbeat is
older than ``stale_seconds`` can be taken over. A run folder is written under a temporary name and renamed
into place when complete, so a folder under ``runs/`` is always whole.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fuselab.train.config import ConfigError

SCHEMA_VERSION = 1
DB_NAME = "fuselab.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL,          -- resolved run config, JSON
    status TEXT NOT NULL,          -- pending | running | done | failed
    owner TEXT,                    -- host:pid of the process that claimed it
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    metrics TEXT,                  -- JSON, when done
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,            -- the spec as written, JSON
    baseline TEXT NOT NULL,
    metric TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS experiment_runs (
    experiment TEXT NOT NULL,
    run_id TEXT NOT NULL,
    method TEXT NOT NULL,
    seed INTEGER NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (experiment, run_id)
);
"""


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str | None) -> bool:
    """Is the claiming process still running? Only decidable on the same host; elsewhere assume yes."""
    if not owner or ":" not in owner:
        return False
    host, pid = owner.rsplit(":", 1)
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


class Store:
    """A result store in a folder (created on first use)."""

    def __init__(self, root: str | Path, *, stale_seconds: float = 600.0) -> None:
        self.root = Path(root)
        self.stale_seconds = stale_seconds
        self.db_path = self.root / DB_NAME

    # -- connection and schema ------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail with one line, before anything is written, if the store cannot be created or written."""
        probe = self.root
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError(f"store path '{self.root}' is not a folder ('{probe}' is a file); pick another --store")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"store path '{self.root}' cannot be written ('{probe}' is read-only); pick another --store")
        if self.db_path.exists() and not os.access(self.db_path, os.W_OK):
            raise ConfigError(f"store database '{self.db_path}' is read-only; pick another --store")

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        self.root.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=60000")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def init(self) -> None:
        with self.connect() as conn:
            conn.executescript(_SCHEMA)  # idempotent; executescript manages its own transaction
        with self.transaction() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise ConfigError(
                    f"store '{self.root}' has schema version {row[0]}, this fuselab reads version {SCHEMA_VERSION}; "
                    "use a new --store folder (the old one stays readable by the fuselab that wrote it)"
                )

    def exists(self) -> bool:
        return self.db_path.is_file()

    # -- experiments --------------------------------------------------------------------------------

    def register_experiment(self, name: str, spec: dict[str, Any], baseline: str, metric: str,
                            runs: list[tuple[str, str, int, dict[str, Any]]]) -> None:
        """Record an experiment's plan: (run id, method, seed, resolved config) in order."""
        now = time.time()
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO experiments VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "spec=excluded.spec, baseline=excluded.baseline, metric=excluded.metric, updated=excluded.updated",
                (name, json.dumps(spec, default=str), baseline, metric, now),
            )
            conn.execute("DELETE FROM experiment_runs WHERE experiment=?", (name,))
            for position, (rid, method, seed, config) in enumerate(runs):
                conn.execute(
                    "INSERT OR IGNORE INTO runs (id, config, status, created) VALUES (?, ?, 'pending', ?)",
                    (rid, json.dumps(config, sort_keys=True, default=str), now),
                )
                conn.execute("INSERT OR REPLACE INTO experiment_runs VALUES (?, ?, ?, ?, ?)", (name, rid, method, seed, position))

    def experiment(self, name: str) -> dict[str, Any]:
        if not self.exists():
            raise ConfigError(f"no store at '{self.root}'; run `fuselab compare` first or pass --store")
        with self.connect() as conn:
            row = conn.execute("SELECT spec, baseline, metric FROM experiments WHERE name=?", (name,)).fetchone()
            if row is None:
                names = [r[0] for r in conn.execute("SELECT name FROM experiments ORDER BY name")]
                import difflib

                close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
                hint = ("did you mean " + " or ".join(f"'{c}'" for c in close) + "?") if close else (
                    f"experiments in this store: {', '.join(names) or 'none'}")
                raise ConfigError(f"unknown experiment '{name}' in store '{self.root}'; {hint}")
        return {"name": name, "spec": json.loads(row[0]), "baseline": row[1], "metric": row[2]}

    def experiment_runs(self, name: str) -> list[dict[str, Any]]:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT e.run_id, e.method, e.seed, r.status, r.metrics, r.error, r.attempts, r.config "
                "FROM experiment_runs e JOIN runs r ON r.id = e.run_id WHERE e.experiment=? ORDER BY e.position",
                (name,),
            ).fetchall()
        return [
            {"run_id": r[0], "method": r[1], "seed": r[2], "status": r[3],
             "metrics": json.loads(r[4]) if r[4] else None, "error": r[5], "attempts": r[6],
             "config": json.loads(r[7])}
            for r in rows
        ]

    # -- claiming and finishing runs ----------------------------------------------------------------

    def status(self, run_id: str) -> str | None:
        with self.connect() as conn:
            row = conn.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()
        return row[0] if row else None

    def claim(self, run_id: str) -> bool:
        """Take a run for this process; False when it is done or another live process holds it."""
        me, now = owner_id(), time.time()
        with self.transaction() as conn:
            row = conn.execute("SELECT status, owner, heartbeat FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            status, owner, heartbeat = row
            if status == "done":
                return False
            if status == "running" and owner != me:
                stale = heartbeat is None or now - heartbeat > self.stale_seconds
                if _alive(owner) and not stale:
                    return False
            conn.execute(
                "UPDATE runs SET status='running', owner=?, heartbeat=?, attempts=attempts+1, error=NULL WHERE id=?",
                (me, now, run_id),
            )
        return True

    def heartbeat(self, run_id: str) -> None:
        with self.connect() as conn:
            conn.execute("UPDATE runs SET heartbeat=? WHERE id=? AND owner=?", (time.time(), run_id, owner_id()))

    def finish(self, run_id: str, metrics: dict[str, Any]) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE runs SET status='done', metrics=?, finished=?, error=NULL WHERE id=?",
                (json.dumps(metrics, default=str), time.time(), run_id),
            )

    def fail(self, run_id: str, error: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET status='failed', error=?, finished=? WHERE id=?", (error, time.time(), run_id))

    # -- maintenance --------------------------------------------------------------------------------

    def select_runs(self, *, experiment: str | None = None, status: str | None = None,
                    prefix: str | None = None) -> list[dict[str, Any]]:
        """Runs filtered by experiment, status and id prefix, with their experiment memberships."""
        if not self.exists():
            raise ConfigError(f"no store at '{self.root}'; run `fuselab compare` first or pass --store")
        if experiment is not None:
            self.experiment(experiment)  # a clear error for an unknown experiment
        query = ("SELECT r.id, r.status, r.owner, r.attempts, r.error, r.metrics, r.finished, "
                 "group_concat(e.experiment || ':' || e.method || ':' || e.seed, ';') "
                 "FROM runs r LEFT JOIN experiment_runs e ON e.run_id = r.id WHERE 1=1")
        args: list[Any] = []
        if status is not None:
            query += " AND r.status = ?"
            args.append(status)
        if prefix is not None:
            query += " AND r.id LIKE ?"
            args.append(prefix + "%")
        if experiment is not None:
            query += " AND r.id IN (SELECT run_id FROM experiment_runs WHERE experiment = ?)"
            args.append(experiment)
        query += " GROUP BY r.id ORDER BY r.created, r.id"
        with self.connect() as conn:
            rows = conn.execute(query, args).fetchall()
        out = []
        for rid, st, owner, attempts, error, metrics, finished, members in rows:
            out.append({"run_id": rid, "status": st, "owner": owner, "attempts": attempts,
                        "error": (error or "").splitlines()[0] if error else None,
                        "metrics": json.loads(metrics) if metrics else None, "finished": finished,
                        "members": [m.split(":") for m in members.split(";")] if members else []})
        return out

    def busy(self, run: dict[str, Any]) -> bool:
        """Is a run being trained right now by a live process?"""
        return run["status"] == "running" and _alive(run["owner"])

    def delete_runs(self, run_ids: list[str]) -> None:
        """Remove runs from the store: rows, experiment memberships and folders."""
        import shutil

        with self.transaction() as conn:
            for rid in run_ids:
                conn.execute("DELETE FROM experiment_runs WHERE run_id=?", (rid,))
                conn.execute("DELETE FROM runs WHERE id=?", (rid,))
        for rid in run_ids:
            shutil.rmtree(self.run_dir(rid), ignore_errors=True)
            shutil.rmtree(self.staging_dir(rid), ignore_errors=True)

    def reset_runs(self, run_ids: list[str]) -> None:
        """Mark runs pending again (their folders are removed), so the next sweep trains them afresh."""
        import shutil

        with self.transaction() as conn:
            for rid in run_ids:
                conn.execute("UPDATE runs SET status='pending', owner=NULL, heartbeat=NULL, error=NULL, "
                             "metrics=NULL, finished=NULL WHERE id=?", (rid,))
        for rid in run_ids:
            shutil.rmtree(self.run_dir(rid), ignore_errors=True)
            shutil.rmtree(self.staging_dir(rid), ignore_errors=True)

    # -- run folders --------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def staging_dir(self, run_id: str) -> Path:
        """Where a run is written while it trains; one per run id (the claim makes it exclusive), so a
        run taken over after a kill finds the resumable state its previous owner left there."""
        return self.root / "runs" / f".partial-{run_id}"

    def publish(self, run_id: str, staging: Path) -> Path:
        """Move a complete run folder into place (replacing any older copy)."""
        final = self.run_dir(run_id)
        if final.exists():
            import shutil

            shutil.rmtree(final)
        os.replace(staging, final)
        return final

    def report_dir(self, experiment: str) -> Path:
        return self.root / experiment / "report"
