"""The store's bookkeeping outside the claim rules, one small direct call at a time (no training): where a
store lives and when it counts as read-only, how its database is created and refused, how an experiment's
plan is recorded (and how a run folder that outlived its database row comes back), the ``missing`` status,
the maintenance calls (select, delete, reset) and the run, partial and report folders.

A process running as root may write anything, so read-only folders and files are simulated by replacing
``os.access`` in the store module with one that refuses writing to chosen paths."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

import fuselab.experiments.store as module
from fuselab.experiments.store import DB_NAME, MISSING, SCHEMA_VERSION, Store, owner_id
from fuselab.train.config import ConfigError


def _deny_writing(monkeypatch, *paths: Path) -> None:
    """``os.access`` as seen by the store: no write permission on ``paths``, everything else allowed."""
    denied = {Path(p) for p in paths}
    real = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) in denied and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(module.os, "access", access)


def _complete_folder(store: Store, run_id: str, metrics=None, *, config: bool = True) -> Path:
    folder = store.run_dir(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"test_accuracy": 0.75} if metrics is None else metrics))
    (folder / "predictions.npz").write_bytes(b"npz")
    if config:
        (folder / "config.yaml").write_text("seed: 0\n")
    return folder


def _row(store: Store, run_id: str) -> dict:
    with store.connect() as conn:
        cur = conn.execute("SELECT * FROM runs WHERE id=?", (run_id,))
        values = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], values)) if values else {}


def _set(store: Store, run_id: str, **columns) -> None:
    names = ", ".join(f"{k}=?" for k in columns)
    with store.connect() as conn:
        conn.execute(f"UPDATE runs SET {names} WHERE id=?", (*columns.values(), run_id))


RUNS = [("r1", "concat", 0, {"seed": 0, "b": 1, "a": 2}), ("r2", "sum", 0, {"seed": 0}), ("r3", "sum", 1, {"seed": 1})]


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "store", stale_seconds=100.0)
    s.init()
    s.register_experiment("x", {"methods": ["concat", "sum"]}, "concat", "accuracy", RUNS)
    return s


# -- where a store lives ----------------------------------------------------------------------------


def test_the_stale_limit_comes_from_the_argument_the_environment_or_ten_minutes(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSELAB_STALE_SECONDS", raising=False)
    default = Store(str(tmp_path / "s"))
    assert default.stale_seconds == 600.0
    assert default.root == tmp_path / "s" and isinstance(default.root, Path)
    assert default.db_path == tmp_path / "s" / "fuselab.sqlite" and DB_NAME == "fuselab.sqlite"
    monkeypatch.setenv("FUSELAB_STALE_SECONDS", "12.5")
    assert Store(tmp_path / "s").stale_seconds == 12.5
    assert Store(tmp_path / "s", stale_seconds=3.0).stale_seconds == 3.0  # the argument wins
    assert Store(tmp_path / "s", stale_seconds=0.0).stale_seconds == 0.0  # 0 is a value, not "unset"
    assert not default.exists()


def test_check_writable_names_the_blocking_path(tmp_path, monkeypatch):
    Store(tmp_path / "a" / "b" / "c").check_writable()  # nothing exists yet: the nearest folder is writable
    assert not (tmp_path / "a").exists()  # and nothing was created
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"store path '{blocker / 's'}' is not a folder \('{blocker}' is a file\)"):
        Store(blocker / "s").check_writable()
    _deny_writing(monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match=rf"cannot be written \('{tmp_path}' is read-only\); pick another"):
        Store(tmp_path / "new" / "store").check_writable()


def test_check_writable_refuses_a_read_only_database(tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    store.init()
    store.check_writable()
    _deny_writing(monkeypatch, store.db_path)
    with pytest.raises(ConfigError, match=rf"store database '{store.db_path}' is read-only; pick another --store"):
        store.check_writable()


def test_read_only_means_the_folder_or_the_database_cannot_be_written(tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    _deny_writing(monkeypatch, store.root, store.db_path)
    assert store.read_only() is False  # no folder yet: it will be created, not read
    monkeypatch.undo()
    store.init()
    assert store.read_only() is False
    _deny_writing(monkeypatch, store.root)
    assert store.read_only() is True
    monkeypatch.undo()
    _deny_writing(monkeypatch, store.db_path)
    assert store.read_only() is True
    monkeypatch.undo()
    store.db_path.unlink()
    _deny_writing(monkeypatch, store.db_path)  # a writable folder without a database: not read-only
    assert store.read_only() is False


# -- creating, opening and refusing the database -------------------------------------------------------


def test_a_new_store_has_the_schema_in_wal_mode_and_leaves_no_temporary_file(tmp_path):
    store = Store(tmp_path / "deep" / "s")
    store.init()
    assert store.exists() and store.db_path.is_file()
    assert sorted(p.name for p in store.root.iterdir() if not p.name.endswith(("-wal", "-shm"))) == [DB_NAME]
    conn = sqlite3.connect(store.db_path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"meta", "runs", "experiments", "experiment_runs"}
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchall() == [(str(SCHEMA_VERSION),)]
        assert SCHEMA_VERSION == 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_a_store_opened_for_reading_only_is_already_complete(tmp_path):
    store = Store(tmp_path / "s")
    assert store.status("r1") is None  # the first connection creates the database (no init)
    conn = sqlite3.connect(store.db_path)
    try:
        assert conn.execute("SELECT key, value FROM meta").fetchall() == [("schema_version", "1")]
    finally:
        conn.close()
    with store.connect() as conn:  # every connection waits up to a minute for a lock
        assert conn.execute("PRAGMA busy_timeout").fetchone() == (60000,)


def test_an_older_database_without_wal_is_switched_to_wal(tmp_path):
    store = Store(tmp_path / "s")
    store.root.mkdir()
    conn = sqlite3.connect(store.db_path)
    conn.executescript(module._SCHEMA)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.commit()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()
    store.init()
    conn = sqlite3.connect(store.db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_create_keeps_a_database_another_process_made_first(tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    store.init()
    store.register_experiment("x", {}, "concat", "accuracy", RUNS[:1])
    store._create()  # as if this process lost the race: the existing database is kept
    assert store.status("r1") == "pending"
    assert [p.name for p in store.root.iterdir() if p.name.endswith(".tmp")] == []


def test_create_without_hard_links_moves_the_database_into_place(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(module.os, "link", no_links)
    store = Store(tmp_path / "s")
    store.init()
    assert store.db_path.is_file() and store.status("nothing") is None
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []


def test_a_database_that_cannot_be_moved_into_place_is_one_line(tmp_path, monkeypatch):
    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(module.os, "link", refuse)
    monkeypatch.setattr(module.os, "replace", refuse)
    store = Store(tmp_path / "s")
    with pytest.raises(ConfigError, match=rf"^store '{store.root}' cannot be written \(Permission denied\); "
                                          "pick another --store$"):
        store.init()
    assert list(store.root.iterdir()) == []  # the temporary database is removed


def test_a_store_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"store '{blocker / 's'}' cannot be created \(.+\); pick another --store"):
        Store(blocker / "s").init()


def test_no_database_in_a_read_only_folder_is_refused_and_nothing_is_created(tmp_path, monkeypatch):
    root = tmp_path / "s"
    root.mkdir()
    _deny_writing(monkeypatch, root)
    with pytest.raises(ConfigError, match=rf"no store database in read-only folder '{root}'; pass the right --store"):
        Store(root).status("r1")
    assert list(root.iterdir()) == []


def test_an_empty_or_foreign_database_is_damaged_with_the_way_out(tmp_path):
    store = Store(tmp_path / "s")
    store.root.mkdir()
    store.db_path.write_bytes(b"")
    aside = store.db_path.with_name(DB_NAME + ".damaged")
    with pytest.raises(ConfigError) as info:
        store.status("r1")
    message = str(info.value)
    assert message.startswith(f"store database '{store.db_path}' is damaged (the file is empty (0 bytes)); ")
    assert f"(mv '{store.db_path}' '{aside}')" in message and f"under '{store.root / 'runs'}'" in message
    assert store.db_path.stat().st_size == 0  # left as found
    store.db_path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="is damaged .*not a database"):
        store.status("r1")
    store.db_path.unlink()  # a database without the store's tables
    conn = sqlite3.connect(store.db_path)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="is damaged .*no such table"):
        store.status("r1")


def test_a_read_only_store_reads_and_refuses_writes_in_one_line(store, monkeypatch):
    claim = store.claim("r1")
    store.finish("r1", {"test_accuracy": 0.5}, claim)
    _complete_folder(store, "r1")
    with sqlite3.connect(store.db_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    _deny_writing(monkeypatch, store.db_path)
    assert store.read_only()
    assert store.status("r1") == "done" and store.status("r2") == "pending"
    assert [r["run_id"] for r in store.experiment_runs("x")] == ["r1", "r2", "r3"]
    with pytest.raises(ConfigError, match=rf"store '{store.root}' is read-only; reports and listings work, "
                                          "training needs a writable --store"):
        store.claim("r2")
    monkeypatch.undo()
    assert store.status("r2") == "pending"  # nothing was written


def test_a_transaction_is_rolled_back_by_an_error(store):
    with pytest.raises(RuntimeError):
        with store.transaction() as conn:
            conn.execute("UPDATE runs SET status='failed' WHERE id='r1'")
            raise RuntimeError("boom")
    assert store.status("r1") == "pending"
    with store.transaction() as conn:
        conn.execute("UPDATE runs SET status='failed' WHERE id='r1'")
    assert store.status("r1") == "failed"


def test_init_restores_a_missing_schema_version_and_refuses_another(tmp_path):
    store = Store(tmp_path / "s")
    store.init()
    with store.transaction() as conn:
        conn.execute("DELETE FROM meta")
    store.init()
    with store.connect() as conn:
        assert conn.execute("SELECT key, value FROM meta").fetchall() == [("schema_version", "1")]
    store.init()  # the same version: accepted, unchanged
    with store.transaction() as conn:
        conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    with pytest.raises(ConfigError, match=rf"store '{store.root}' has schema version 2, this fuselab reads version 1; "
                                          "use a new --store folder"):
        store.init()


# -- experiments -------------------------------------------------------------------------------------


def test_register_experiment_records_the_plan_in_order(store):
    with store.connect() as conn:
        exp = conn.execute("SELECT name, spec, baseline, metric, updated FROM experiments").fetchall()
        members = conn.execute("SELECT experiment, run_id, method, seed, position FROM experiment_runs "
                               "ORDER BY position").fetchall()
    assert [(n, json.loads(s), b, m) for n, s, b, m, _ in exp] == [
        ("x", {"methods": ["concat", "sum"]}, "concat", "accuracy")]
    assert abs(exp[0][4] - time.time()) < 60
    assert members == [("x", "r1", "concat", 0, 0), ("x", "r2", "sum", 0, 1), ("x", "r3", "sum", 1, 2)]
    row = _row(store, "r1")
    assert row["config"] == json.dumps({"a": 2, "b": 1, "seed": 0})  # sorted keys: one text per config
    assert (row["status"], row["owner"], row["heartbeat"], row["attempts"], row["error"], row["metrics"],
            row["finished"]) == ("pending", None, None, 0, None, None, None)
    assert abs(row["created"] - time.time()) < 60
    assert store.experiment("x") == {"name": "x", "spec": {"methods": ["concat", "sum"]}, "baseline": "concat",
                                     "metric": "accuracy"}


def test_registering_again_updates_the_plan_and_keeps_the_runs(store):
    claim = store.claim("r2")
    store.finish("r2", {"test_accuracy": 0.5}, claim)
    _complete_folder(store, "r2")
    store.register_experiment("x", {"methods": ["sum"]}, "sum", "kappa", [("r2", "sum", 0, {"seed": 5}),
                                                                         ("r4", "sum", 2, {"seed": 2})])
    assert store.experiment("x") == {"name": "x", "spec": {"methods": ["sum"]}, "baseline": "sum", "metric": "kappa"}
    runs = store.experiment_runs("x")
    assert [(r["run_id"], r["method"], r["seed"], r["status"]) for r in runs] == [
        ("r2", "sum", 0, "done"), ("r4", "sum", 2, "pending")]  # r1 and r3 left the plan; r2 kept its result
    assert runs[0]["config"] == {"seed": 0}  # an existing run keeps its stored config
    assert runs[0]["metrics"] == {"test_accuracy": 0.5} and runs[0]["attempts"] == 1
    assert store.status("r1") == "pending"  # still stored, only no longer in the plan
    store.register_experiment("y", {}, "sum", "accuracy", [("r1", "concat", 0, {})])
    assert [r["run_id"] for r in store.experiment_runs("x")] == ["r2", "r4"]  # another experiment leaves x alone
    assert [r["run_id"] for r in store.experiment_runs("y")] == ["r1"]


def test_a_run_folder_that_outlived_its_database_row_comes_back_done(tmp_path):
    store = Store(tmp_path / "s")
    store.init()
    _complete_folder(store, "r1", {"test_accuracy": 0.875})
    _complete_folder(store, "r2", config=False)  # incomplete: no config.yaml
    folder = _complete_folder(store, "r3")
    (folder / "metrics.json").write_text("{not json")
    store.register_experiment("x", {}, "concat", "accuracy", RUNS)
    row = _row(store, "r1")
    assert (row["status"], json.loads(row["metrics"]), row["attempts"]) == ("done", {"test_accuracy": 0.875}, 1)
    assert abs(row["finished"] - time.time()) < 60
    assert _row(store, "r2")["status"] == "pending" and _row(store, "r3")["status"] == "pending"
    assert store.experiment_runs("x")[0]["metrics"] == {"test_accuracy": 0.875}


def test_specs_and_configs_with_paths_are_stored_as_text(tmp_path):
    store = Store(tmp_path / "s")
    store.register_experiment("x", {"root": tmp_path / "data"}, "concat", "accuracy",
                              [("r1", "concat", 0, {"data_root": tmp_path / "data"})])
    assert store.experiment("x")["spec"] == {"root": str(tmp_path / "data")}
    assert store.experiment_runs("x")[0]["config"] == {"data_root": str(tmp_path / "data")}


def test_only_a_new_row_is_taken_from_its_folder(store):
    _complete_folder(store, "r1", {"test_accuracy": 0.25})
    store.register_experiment("x", {}, "concat", "accuracy", RUNS)  # r1 is already stored, pending: the row wins
    assert _row(store, "r1")["status"] == "pending" and _row(store, "r1")["metrics"] is None


def test_finished_folder_needs_every_file_and_a_metrics_object(store):
    assert store._finished_folder("r1") is None  # no folder
    folder = _complete_folder(store, "r1", {"test_accuracy": 0.5, "n": 3})
    assert store._finished_folder("r1") == {"test_accuracy": 0.5, "n": 3}
    for name in ("metrics.json", "predictions.npz", "config.yaml"):
        moved = folder / name
        moved.rename(folder / (name + ".away"))
        assert store._finished_folder("r1") is None, name
        (folder / (name + ".away")).rename(moved)
    (folder / "metrics.json").write_text("[0.5]")  # JSON, but not an object of metrics
    assert store._finished_folder("r1") is None
    (folder / "metrics.json").write_text("")
    assert store._finished_folder("r1") is None
    (folder / "metrics.json").unlink()
    (folder / "metrics.json").mkdir()  # a folder where the file should be
    assert store._finished_folder("r1") is None


def test_unknown_experiments_are_named_with_a_suggestion(tmp_path, store):
    with pytest.raises(ConfigError, match=rf"no store at '{tmp_path / 'none'}'; run `fuselab compare` first"):
        Store(tmp_path / "none").experiment("x")
    store.register_experiment("compare-avmnist", {}, "concat", "accuracy", [])
    with pytest.raises(ConfigError, match=rf"unknown experiment 'compare-avmnis' in store '{store.root}'; "
                                          r"did you mean 'compare-avmnist'\?"):
        store.experiment("compare-avmnis")
    with pytest.raises(ConfigError, match="unknown experiment 'zzzzzzzz'.*; experiments in this store: "
                                          "compare-avmnist, x$"):
        store.experiment("zzzzzzzz")
    store.register_experiment("compare-avmnist2", {}, "concat", "accuracy", [])
    with pytest.raises(ConfigError, match=r"did you mean 'compare-avmnist' or 'compare-avmnist2'\?$"):
        store.experiment("compare-avmnis")
    empty = Store(tmp_path / "empty")
    empty.init()
    with pytest.raises(ConfigError, match="experiments in this store: none$"):
        empty.experiment("x")


# -- statuses ----------------------------------------------------------------------------------------


def test_a_done_run_without_its_folder_files_is_missing(store):
    assert store.status("nope") is None
    assert store.status("r1") == "pending"
    claim = store.claim("r1")
    store.finish("r1", {"test_accuracy": 0.5}, claim)
    assert store.status("r1") == MISSING == "missing"
    folder = _complete_folder(store, "r1", config=False)  # config.yaml is not needed for a report
    assert store.status("r1") == "done"
    (folder / "predictions.npz").unlink()
    assert store.status("r1") == "missing"
    (folder / "predictions.npz").write_bytes(b"npz")
    (folder / "metrics.json").unlink()
    assert store.status("r1") == "missing"
    for status in ("pending", "running", "failed", "interrupted"):  # only a done run can be missing
        _set(store, "r2", status=status)
        assert store.status("r2") == status
    runs = {r["run_id"]: r for r in store.experiment_runs("x")}
    assert runs["r1"]["status"] == "missing" and runs["r2"]["status"] == "interrupted"


def test_experiment_runs_read_every_column(store):
    claim = store.claim("r1")
    store.fail("r1", "out of memory\nat line 3", claim)
    claim = store.claim("r2")
    store.finish("r2", {"test_accuracy": 0.5}, claim)
    _complete_folder(store, "r2")
    r1, r2, r3 = store.experiment_runs("x")
    assert r1 == {"run_id": "r1", "method": "concat", "seed": 0, "status": "failed", "metrics": None,
                  "error": "out of memory\nat line 3", "attempts": 1, "config": {"a": 2, "b": 1, "seed": 0}}
    assert (r2["status"], r2["metrics"], r2["error"], r2["attempts"]) == ("done", {"test_accuracy": 0.5}, None, 1)
    assert (r3["run_id"], r3["seed"], r3["status"], r3["attempts"]) == ("r3", 1, "pending", 0)
    assert store.experiment_runs("unknown") == []


# -- maintenance -------------------------------------------------------------------------------------


def test_select_runs_filters_by_status_prefix_and_experiment(store, tmp_path):
    with pytest.raises(ConfigError, match="no store at"):
        Store(tmp_path / "none").select_runs()
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        store.select_runs(experiment="nope")
    store.register_experiment("y", {}, "sum", "accuracy", [("r3", "sum", 1, {"seed": 1}), ("q1", "gmu", 4, {})])
    _set(store, "r1", created=1.0)
    _set(store, "r2", created=1.0)
    _set(store, "r3", created=0.5)
    _set(store, "q1", created=2.0)
    first = store.claim("r1")
    store.fail("r1", "first line\nsecond line", first)
    claim = store.claim("r2")
    store.finish("r2", {"test_accuracy": 0.5}, claim)
    everything = store.select_runs()
    assert [r["run_id"] for r in everything] == ["r3", "r1", "r2", "q1"]  # by creation time, then id
    by_id = {r["run_id"]: r for r in everything}
    assert by_id["r1"]["error"] == "first line" and by_id["r1"]["status"] == "failed"
    assert by_id["r1"]["owner"] == first and by_id["r3"]["owner"] is None
    assert by_id["r1"]["attempts"] == 1 and by_id["r1"]["metrics"] is None and by_id["r1"]["finished"] > 0
    assert by_id["r2"]["status"] == "missing" and by_id["r2"]["metrics"] == {"test_accuracy": 0.5}
    assert by_id["r2"]["error"] is None and by_id["q1"]["finished"] is None
    assert sorted(by_id["r3"]["members"]) == [["x", "sum", "1"], ["y", "sum", "1"]]
    assert by_id["q1"]["members"] == [["y", "gmu", "4"]]
    assert [r["run_id"] for r in store.select_runs(status="failed")] == ["r1"]
    assert [r["run_id"] for r in store.select_runs(status="missing")] == ["r2"]
    assert store.select_runs(status="done") == []  # done in the table, but its folder is gone
    _complete_folder(store, "r2")
    assert [r["run_id"] for r in store.select_runs(status="done")] == ["r2"]
    assert store.select_runs(status="missing") == []
    assert [r["run_id"] for r in store.select_runs(status="pending")] == ["r3", "q1"]
    assert [r["run_id"] for r in store.select_runs(prefix="r")] == ["r3", "r1", "r2"]
    assert [r["run_id"] for r in store.select_runs(prefix="q")] == ["q1"]
    assert [r["run_id"] for r in store.select_runs(experiment="y")] == ["r3", "q1"]
    assert [r["run_id"] for r in store.select_runs(experiment="x", status="pending")] == ["r3"]
    assert [r["run_id"] for r in store.select_runs(experiment="y", prefix="q")] == ["q1"]
    orphan = Store(tmp_path / "o")
    orphan.init()
    with orphan.transaction() as conn:
        conn.execute("INSERT INTO runs (id, config, status, created) VALUES ('z', '{}', 'pending', 0)")
    assert orphan.select_runs()[0]["members"] == []  # a run of no experiment


def test_busy_means_running_in_a_live_process(store):
    assert store.busy({"status": "running", "owner": owner_id("t")})
    assert not store.busy({"status": "running", "owner": None})
    assert not store.busy({"status": "done", "owner": owner_id("t")})
    assert not store.busy({"status": "failed", "owner": owner_id("t")})


def _partial(store: Store, run_id: str, token: str, files: dict[str, str], mtime: float) -> Path:
    folder = store.staging_dir(run_id, f"host:1:{token}")
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    os.utime(folder, (mtime, mtime))
    return folder


def test_delete_runs_removes_rows_memberships_and_folders_of_those_runs_only(store):
    for rid in ("r1", "r2"):
        _complete_folder(store, rid)
        _partial(store, rid, "aaa", {"resume.pt": "x"}, 1000.0)
    store.delete_runs(["r1"])
    assert store.status("r1") is None and store.status("r2") == "pending"
    assert [r["run_id"] for r in store.experiment_runs("x")] == ["r2", "r3"]
    with store.connect() as conn:
        assert conn.execute("SELECT count(*) FROM experiment_runs WHERE run_id='r1'").fetchone() == (0,)
    assert not store.run_dir("r1").exists() and store.partial_dirs("r1") == []
    assert store.run_dir("r2").is_dir() and len(store.partial_dirs("r2")) == 1
    store.delete_runs(["r2", "r3"])
    assert store.experiment_runs("x") == [] and store.select_runs() == []


def test_reset_runs_makes_them_pending_again_without_their_folders(store):
    claim = store.claim("r1")
    store.finish("r1", {"test_accuracy": 0.5}, claim)
    claim = store.claim("r2")
    store.fail("r2", "boom", claim)
    for rid in ("r1", "r2", "r3"):
        _complete_folder(store, rid)
        _partial(store, rid, "aaa", {"resume.pt": "x"}, 1000.0)
    store.reset_runs(["r1", "r2"])
    for rid in ("r1", "r2"):
        row = _row(store, rid)
        assert (row["status"], row["owner"], row["heartbeat"], row["error"], row["metrics"], row["finished"]) == (
            "pending", None, None, None, None, None), rid
        assert row["attempts"] == 1  # the count of attempts is kept
        assert not store.run_dir(rid).exists() and store.partial_dirs(rid) == []
    assert store.run_dir("r3").is_dir() and len(store.partial_dirs("r3")) == 1
    assert [r["run_id"] for r in store.experiment_runs("x")] == ["r1", "r2", "r3"]
    store.register_experiment("y", {}, "sum", "accuracy", [("r4", "sum", 0, {})])
    store.reset_runs(["r4"])  # a run that never had a folder
    assert store.status("r4") == "pending"


# -- run folders -------------------------------------------------------------------------------------


def test_run_staging_and_report_folders(store):
    assert store.run_dir("r1") == store.root / "runs" / "r1"
    assert store.staging_dir("r1", "host:12:abc") == store.root / "runs" / ".partial-r1-abc"
    assert store.staging_dir("r1", "abc") == store.root / "runs" / ".partial-r1-abc"
    assert store.staging_dir("r1") == store.root / "runs" / ".partial-r1"
    assert store.report_dir("my-compare") == store.root / "my-compare" / "report"
    with pytest.raises(ConfigError, match="is not a safe folder name"):
        store.report_dir("../escape")


def test_partial_dirs_are_this_runs_folders_oldest_first(store):
    assert store.partial_dirs("r1") == []  # no runs/ folder yet
    newer = _partial(store, "r1", "aaa", {}, 2000.0)  # names in the other order than times
    older = _partial(store, "r1", "bbb", {}, 1000.0)
    _partial(store, "r2", "ccc", {}, 500.0)
    (store.root / "runs" / ".partial-r1-file").write_text("not a folder")
    assert store.partial_dirs("r1") == [older, newer]
    assert len(store.partial_dirs("r2")) == 1


def test_start_attempt_seeds_from_the_newest_resumable_attempt(store):
    _partial(store, "r1", "aaa", {"resume.pt": "old"}, 1000.0)
    _partial(store, "r1", "bbb", {"resume.pt": "new", "x.tmp": "half"}, 2000.0)
    _partial(store, "r1", "ccc", {"log.txt": "no state"}, 3000.0)  # newest, but nothing to resume
    own = store.start_attempt("r1", "host:1:ddd")
    assert own == store.staging_dir("r1", "ddd") and own.is_dir()
    assert sorted(p.name for p in own.iterdir()) == ["resume.pt"]  # the half-written file is left behind
    assert (own / "resume.pt").read_text() == "new"
    assert store.partial_dirs("r1") == [own]  # the earlier attempts are removed


def test_start_attempt_resumes_a_finished_fold_and_keeps_its_own_folder(store):
    _partial(store, "r1", "aaa", {"finished-fold0.pt": "fold"}, 1000.0)
    own = store.start_attempt("r1", "host:1:bbb")
    assert (own / "finished-fold0.pt").read_text() == "fold"
    (own / "resume.pt").write_text("mine")
    _partial(store, "r1", "ccc", {"resume.pt": "other"}, 500.0)
    again = store.start_attempt("r1", "host:1:bbb")  # the same claim again: its own state is kept
    assert again == own and (own / "resume.pt").read_text() == "mine"
    assert store.partial_dirs("r1") == [own]
    fresh = store.start_attempt("r2", "host:1:eee")  # nothing earlier: an empty folder
    assert fresh.is_dir() and list(fresh.iterdir()) == []
    assert not (store.root / "new").exists()
    first = Store(store.root / "new").start_attempt("r1", "host:1:fff")  # no runs/ folder yet: it is made
    assert first == store.root / "new" / "runs" / ".partial-r1-fff" and first.is_dir()


def test_publish_replaces_an_older_copy(store):
    old = _complete_folder(store, "r1")
    (old / "stale.txt").write_text("old")
    staging = _partial(store, "r1", "aaa", {"metrics.json": "{}"}, 1000.0)
    assert store.publish("r1", staging) == store.run_dir("r1")
    assert sorted(p.name for p in store.run_dir("r1").iterdir()) == ["metrics.json"] and not staging.exists()
    staging = _partial(store, "r2", "aaa", {"metrics.json": "{}"}, 1000.0)
    assert store.publish("r2", staging) == store.run_dir("r2") and store.run_dir("r2").is_dir()


def test_a_partial_folder_removed_meanwhile_by_another_process_is_not_an_error(store, monkeypatch):
    gone = store.root / "runs" / ".partial-r1-gone"  # listed, then removed by the new owner of the claim
    real = Store.partial_dirs
    monkeypatch.setattr(Store, "partial_dirs", lambda self, run_id: [gone, *real(self, run_id)])
    own = store.start_attempt("r1", "host:1:abc")
    assert own.is_dir() and not gone.exists()
    store.reset_runs(["r1"])
    assert store.status("r1") == "pending" and not own.exists()
    store.delete_runs(["r1"])
    assert store.status("r1") is None


def test_suggestions_list_up_to_three_names_at_least_half_alike(tmp_path):
    store = Store(tmp_path / "s")
    store.register_experiment("alpine", {}, "concat", "accuracy", [])
    with pytest.raises(ConfigError, match=r"did you mean 'alpine'\?$"):  # a ratio of 6/11 = 0.55
        store.experiment("alpha")
    for name in ("exp-a1", "exp-a2", "exp-a3", "exp-a4"):
        store.register_experiment(name, {}, "concat", "accuracy", [])
    with pytest.raises(ConfigError, match=r"did you mean 'exp-a4' or 'exp-a3' or 'exp-a2'\?$"):
        store.experiment("exp-a")  # four as alike: three of them, as difflib orders equal ratios


def test_alive_only_asks_whether_the_process_exists(monkeypatch):
    sent = []
    monkeypatch.setattr(module.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    assert module._alive(owner_id("t"))
    assert sent == [(os.getpid(), 0)]  # signal 0: a check, nothing is delivered


def test_select_runs_by_status_goes_on_after_a_missing_run(store):
    for rid, created in (("r1", 1.0), ("r2", 2.0), ("r3", 3.0)):
        _set(store, rid, created=created)
        claim = store.claim(rid)
        store.finish(rid, {"test_accuracy": 0.5}, claim)
    _complete_folder(store, "r3")  # r1 and r2 are missing their folders
    assert [r["run_id"] for r in store.select_runs(status="done")] == ["r3"]
    assert [r["run_id"] for r in store.select_runs(status="missing")] == ["r1", "r2"]
