"""The result store: SQLite for the run table, a folder per run for its files.

Layout of a store folder::

    fuselab.sqlite          runs, experiments, which runs belong to which experiment
    runs/<run id>/          config.yaml, metrics.json, history.csv, predictions.npz, checkpoint.pt, logs/
    <experiment>/report/    tables written by ``fuselab report``

A run is *claimed* in one transaction before it trains, so that neither an interrupted sweep nor two
sweeps on the same store train it twice. A claim carries a token; only the holder of the current token
can heartbeat, finish or fail the run, so a process whose claim was taken over can never publish over or
flip the result of the new owner. A claim whose process is gone (same host) or whose heartbeat is older
than ``stale_seconds`` can be taken over. Each claim writes into its own partial folder
(``runs/.partial-<id>-<token>``, seeded with the resumable state a previous attempt left), which is renamed
into place, in the transaction that marks the run done, when complete: a folder under ``runs/`` is always
whole.

The store refuses, with one line that says what to do, a database that is damaged, truncated or empty, and
opens a store it cannot write (a read-only copy, an archive) read-only. SQLite's locking needs a local
file system: a store on NFS or SMB can lose or double runs (see docs/scale.md).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fuselab.errors import ConfigError

SCHEMA_VERSION = 1
DB_NAME = "fuselab.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL,          -- resolved run config, JSON
    status TEXT NOT NULL,          -- pending | running | done | failed | interrupted
    owner TEXT,                    -- host:pid:token of the claim (host:pid in older stores)
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


STATUSES = ("pending", "running", "done", "failed", "interrupted")
MISSING = "missing"  # not stored: a done run whose folder is gone (``Store.experiment_runs`` reports it)
RUN_FILES = ("metrics.json", "predictions.npz")  # a done run's folder without these cannot be reported


def owner_id(token: str | None = None) -> str:
    """``host:pid`` of this process, with ``:token`` for one claim."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    return f"{me}:{token}" if token else me


def _alive(owner: str | None) -> bool:
    """Is the claiming process still running? Only decidable on the same host; elsewhere assume yes."""
    if not owner or ":" not in owner:
        return False
    host, pid = owner.split(":")[:2]
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def _damaged(db_path: Path, problem: str) -> ConfigError:
    aside = db_path.with_name(db_path.name + ".damaged")
    return ConfigError(
        f"store database '{db_path}' is damaged ({problem}); restore it from a backup, or move it aside "
        f"(mv '{db_path}' '{aside}'): the next `fuselab compare` re-registers the finished run folders under "
        f"'{db_path.parent / 'runs'}' without training them again"
    )


class Store:
    """A result store in a folder (created on first use)."""

    def __init__(self, root: str | Path, *, stale_seconds: float | None = None) -> None:
        self.root = Path(root)
        if stale_seconds is None:  # FUSELAB_STALE_SECONDS: for clusters with long pauses, and for tests
            stale_seconds = float(os.environ.get("FUSELAB_STALE_SECONDS", 600.0))
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

    def read_only(self) -> bool:
        """A store this process cannot write (its folder or database is read-only): opened with ``mode=ro``."""
        if not self.root.is_dir():
            return False
        if not os.access(self.root, os.W_OK | os.X_OK):
            return True
        return self.db_path.exists() and not os.access(self.db_path, os.W_OK)

    def _create(self) -> None:
        """Create the database with its schema under a temporary name and link it into place, so that a
        database file is never seen half-made (an empty one is always damage, never a new store)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"store '{self.root}' cannot be created ({exc.strerror}); pick another --store") from None
        tmp = self.root / f".{DB_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            finally:
                conn.close()
            try:
                os.link(tmp, self.db_path)  # fails if another process created it first: theirs is kept
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not self.db_path.exists():
                    os.replace(tmp, self.db_path)
        except OSError as exc:
            raise ConfigError(f"store '{self.root}' cannot be written ({exc.strerror}); pick another --store") from None
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
                leftover.unlink(missing_ok=True)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection (the database is created on first use). A read-only store is opened with
        ``mode=ro`` (and without the WAL pragma, which writes); a damaged or emptied database is refused
        with one line that says how to recover."""
        if not self.db_path.exists():
            if self.root.is_dir() and self.read_only():
                raise ConfigError(f"no store database in read-only folder '{self.root}'; pass the right --store")
            self._create()
        elif self.db_path.stat().st_size == 0:
            raise _damaged(self.db_path, "the file is empty (0 bytes)")
        read_only = self.read_only()
        try:
            if read_only:
                conn = sqlite3.connect(f"{self.db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=60,
                                       isolation_level=None)
                try:
                    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError:  # a WAL database whose -shm cannot be made here
                    conn.close()
                    conn = sqlite3.connect(f"{self.db_path.resolve().as_uri()}?immutable=1", uri=True,
                                           isolation_level=None)
            else:
                conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA busy_timeout=60000")
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise _damaged(self.db_path, str(exc)) from None
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            text = str(exc)
            if "malformed" in text or "not a database" in text or "no such table" in text:
                raise _damaged(self.db_path, text) from None
            if read_only and "readonly" in text:
                raise ConfigError(f"store '{self.root}' is read-only; reports and listings work, "
                                  "training needs a writable --store") from None
            raise
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
                added = conn.execute(
                    "INSERT OR IGNORE INTO runs (id, config, status, created) VALUES (?, ?, 'pending', ?)",
                    (rid, json.dumps(config, sort_keys=True, default=str), now),
                ).rowcount
                metrics = self._finished_folder(rid) if added else None
                if metrics is not None:  # a run folder that outlived its database row (a replaced database)
                    conn.execute("UPDATE runs SET status='done', metrics=?, finished=?, attempts=1 WHERE id=?",
                                 (json.dumps(metrics, default=str), now, rid))
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
            {"run_id": r[0], "method": r[1], "seed": r[2], "status": self._status(r[0], r[3]),
             "metrics": json.loads(r[4]) if r[4] else None, "error": r[5], "attempts": r[6],
             "config": json.loads(r[7])}
            for r in rows
        ]

    def _status(self, run_id: str, status: str) -> str:
        """The stored status, or ``missing`` for a done run whose folder is gone or incomplete."""
        if status == "done" and not all((self.run_dir(run_id) / f).is_file() for f in RUN_FILES):
            return MISSING
        return status

    def _finished_folder(self, run_id: str) -> dict[str, Any] | None:
        """The metrics of a complete run folder under ``runs/``, or None."""
        folder = self.run_dir(run_id)
        if not all((folder / f).is_file() for f in (*RUN_FILES, "config.yaml")):
            return None
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        return metrics if isinstance(metrics, dict) else None

    # -- claiming and finishing runs ----------------------------------------------------------------

    def done_ids(self) -> set[str]:
        """The ids of every done run in the store (empty for a store whose tables are not created yet)."""
        try:
            with self.connect() as conn:
                return {r[0] for r in conn.execute("SELECT id FROM runs WHERE status='done'")}
        except sqlite3.Error:
            return set()

    def status(self, run_id: str) -> str | None:
        """The run's status (``missing`` for a done run whose folder is gone), None for an unknown id."""
        with self.connect() as conn:
            row = conn.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()
        return self._status(run_id, row[0]) if row else None

    def claim(self, run_id: str) -> str | None:
        """Take a run for this process: its claim (``host:pid:token``, what ``heartbeat``, ``finish`` and
        ``fail`` need, also in a worker process), or None when it is done or another live process
        holds a fresh claim. A done run whose folder is gone (``missing``) is not claimed: it is trained
        again only on request (``fuselab runs retry --status missing``)."""
        token = uuid.uuid4().hex[:12]
        now = time.time()
        with self.transaction() as conn:
            row = conn.execute("SELECT status, owner, heartbeat FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            status, owner, heartbeat = row
            if status == "done":
                return None
            if status == "running":
                stale = heartbeat is None or now - heartbeat > self.stale_seconds
                if _alive(owner) and not stale:
                    return None
            claim = owner_id(token)
            conn.execute(
                "UPDATE runs SET status='running', owner=?, heartbeat=?, attempts=attempts+1, error=NULL WHERE id=?",
                (claim, now, run_id),
            )
        return claim

    def _owner_clause(self, token: str | None) -> tuple[str, tuple[str, ...]]:
        """SQL matching the claim ``token``, or (without one) any claim held by this process."""
        if token:
            return "owner = ?", (token,)
        me = owner_id()
        return "(owner = ? OR owner LIKE ?)", (me, me + ":%")

    def heartbeat(self, run_id: str, token: str | None = None) -> bool:
        """Refresh the claim; False when it is no longer ours (taken over, or reset)."""
        clause, args = self._owner_clause(token)
        with self.connect() as conn:
            cur = conn.execute(f"UPDATE runs SET heartbeat=? WHERE id=? AND status='running' AND {clause}",
                               (time.time(), run_id, *args))
            return cur.rowcount == 1

    def holds(self, run_id: str, token: str | None = None) -> bool:
        clause, args = self._owner_clause(token)
        with self.connect() as conn:
            row = conn.execute(f"SELECT 1 FROM runs WHERE id=? AND status='running' AND {clause}",
                               (run_id, *args)).fetchone()
        return row is not None

    def finish(self, run_id: str, metrics: dict[str, Any], token: str | None = None,
               staging: Path | None = None) -> bool:
        """Mark the run done (publishing ``staging`` as its folder) if the claim ``token`` still holds it;
        False, and nothing changed, when another process has taken it over."""
        clause, args = self._owner_clause(token)
        with self.transaction() as conn:
            row = conn.execute(f"SELECT 1 FROM runs WHERE id=? AND status='running' AND {clause}",
                               (run_id, *args)).fetchone()
            if row is None:
                return False
            if staging is not None:  # inside the transaction: no other owner can publish meanwhile
                self.publish(run_id, staging)
            conn.execute(
                "UPDATE runs SET status='done', metrics=?, finished=?, error=NULL WHERE id=?",
                (json.dumps(metrics, default=str), time.time(), run_id),
            )
        return True

    def fail(self, run_id: str, error: str, token: str | None = None, *, status: str = "failed") -> bool:
        """Mark the run failed (or ``interrupted``) if the claim ``token`` still holds it; False otherwise."""
        clause, args = self._owner_clause(token)
        with self.transaction() as conn:
            cur = conn.execute(
                f"UPDATE runs SET status=?, error=?, finished=? WHERE id=? AND status='running' AND {clause}",
                (status, error, time.time(), run_id, *args))
            return cur.rowcount == 1

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
        wanted = status
        if status is not None:  # missing is a done run without its folder
            query += " AND r.status = ?"
            args.append("done" if status == MISSING else status)
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
            st = self._status(rid, st)
            if wanted is not None and st != wanted:
                continue
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
        with self.transaction() as conn:
            for rid in run_ids:
                conn.execute("DELETE FROM experiment_runs WHERE run_id=?", (rid,))
                conn.execute("DELETE FROM runs WHERE id=?", (rid,))
        for rid in run_ids:
            shutil.rmtree(self.run_dir(rid), ignore_errors=True)
            for folder in self.partial_dirs(rid):
                shutil.rmtree(folder, ignore_errors=True)

    def reset_runs(self, run_ids: list[str]) -> None:
        """Mark runs pending again (their folders are removed), so the next sweep trains them afresh."""
        with self.transaction() as conn:
            for rid in run_ids:
                conn.execute("UPDATE runs SET status='pending', owner=NULL, heartbeat=NULL, error=NULL, "
                             "metrics=NULL, finished=NULL WHERE id=?", (rid,))
        for rid in run_ids:
            shutil.rmtree(self.run_dir(rid), ignore_errors=True)
            for folder in self.partial_dirs(rid):
                shutil.rmtree(folder, ignore_errors=True)

    # -- run folders --------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def staging_dir(self, run_id: str, token: str | None = None) -> Path:
        """Where one claim of a run writes while it trains (``.partial-<id>-<token>``); without a token the
        folder of stores written before claims had tokens."""
        suffix = f"-{token.rsplit(':', 1)[-1]}" if token else ""
        return self.root / "runs" / f".partial-{run_id}{suffix}"

    def partial_dirs(self, run_id: str) -> list[Path]:
        """Every partial folder of a run (this and earlier attempts), oldest first."""
        folder = self.root / "runs"
        if not folder.is_dir():
            return []
        found = [p for p in folder.glob(f".partial-{run_id}*") if p.is_dir()]
        return sorted(found, key=lambda p: p.stat().st_mtime)

    def start_attempt(self, run_id: str, token: str) -> Path:
        """The partial folder of the claim ``token``, seeded with the resumable state the newest earlier
        attempt left (a killed or interrupted run continues where it was); earlier folders are removed.
        Only called by the holder of the claim, so their owners are gone or have lost the run."""
        own = self.staging_dir(run_id, token)
        earlier = [p for p in self.partial_dirs(run_id) if p != own]
        resumable = [p for p in earlier if any(p.glob("resume*.pt")) or any(p.glob("finished-fold*.pt"))]
        if resumable and not own.exists():
            shutil.copytree(resumable[-1], own, ignore=shutil.ignore_patterns("*.tmp"))
        own.mkdir(parents=True, exist_ok=True)
        for folder in earlier:
            shutil.rmtree(folder, ignore_errors=True)
        return own

    def publish(self, run_id: str, staging: Path) -> Path:
        """Move a complete run folder into place (replacing any older copy)."""
        final = self.run_dir(run_id)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        return final

    def report_dir(self, experiment: str) -> Path:
        from fuselab.experiments.spec import check_experiment_name

        return self.root / check_experiment_name(experiment) / "report"  # a stored name may be tampered with
