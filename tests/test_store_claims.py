"""The store's claim rules, one condition at a time: who may take a run, when a claim is stale, and that a
claim taken over can no longer heartbeat, finish or fail the run. Each test sets the stored owner and heartbeat
directly, so the boundary of every condition is checked from both sides."""

from __future__ import annotations

import json
import socket
import time

import pytest

from fuselab.experiments.store import Store, _alive, owner_id

STALE = 100.0


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "store", stale_seconds=STALE)
    s.init()
    s.register_experiment("x", {}, "concat", "accuracy", [("r1", "concat", 0, {"seed": 0}),
                                                       ("r2", "sum", 0, {"seed": 0})])
    return s


def _set(store: Store, run_id: str, **columns) -> None:
    names = ", ".join(f"{k}=?" for k in columns)
    with store.connect() as conn:
        conn.execute(f"UPDATE runs SET {names} WHERE id=?", (*columns.values(), run_id))


def _row(store: Store, run_id: str) -> dict:
    with store.connect() as conn:
        cur = conn.execute("SELECT status, owner, heartbeat, attempts, error, metrics FROM runs WHERE id=?", (run_id,))
        return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def _dead_pid() -> int:
    pid = 2**22 - 3  # above the usual pid range; check that nothing runs there
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
    return pid


def test_a_pending_run_is_claimed_with_a_token_of_this_process(store):
    claim = store.claim("r1")
    host, pid, token = claim.split(":")
    assert f"{host}:{pid}" == owner_id() and len(token) == 12
    row = _row(store, "r1")
    assert row["status"] == "running" and row["owner"] == claim and row["attempts"] == 1
    assert time.time() - row["heartbeat"] < 5
    assert store.status("r1") == "running" and store.status("r2") == "pending"
    assert store.claim("r1") is None  # held by a live process with a fresh heartbeat
    with pytest.raises(KeyError):
        store.claim("nope")


def test_a_claim_goes_stale_strictly_after_stale_seconds(store):
    live = owner_id("other")  # this process is alive
    _set(store, "r1", status="running", owner=live, heartbeat=time.time() - STALE + 20)
    assert store.claim("r1") is None  # 80 s old: still fresh
    _set(store, "r1", heartbeat=time.time() - STALE - 20)
    claim = store.claim("r1")  # 120 s old: stale, taken over
    assert claim is not None and claim != live
    assert _row(store, "r1")["attempts"] == 1
    _set(store, "r1", heartbeat=None)
    assert store.claim("r1") is not None  # no heartbeat at all counts as stale


def test_a_dead_owner_on_this_host_loses_a_fresh_claim_and_another_host_keeps_it(store):
    here = socket.gethostname()
    _set(store, "r1", status="running", owner=f"{here}:{_dead_pid()}:abc", heartbeat=time.time())
    assert store.claim("r1") is not None  # its process is gone: taken over at once
    _set(store, "r2", status="running", owner="another-host.example:1:abc", heartbeat=time.time())
    assert store.claim("r2") is None  # cannot check a process elsewhere: assumed alive while fresh
    _set(store, "r2", heartbeat=time.time() - STALE - 1)
    assert store.claim("r2") is not None


def test_alive_reads_host_and_pid():
    import os

    assert _alive(owner_id()) and _alive(owner_id("tok"))
    assert not _alive(None) and not _alive("") and not _alive("no-colon")
    assert not _alive(f"{socket.gethostname()}:{_dead_pid()}")
    assert _alive(f"elsewhere.example:{os.getpid()}")
    assert _alive(f"{socket.gethostname()}:not-a-pid")  # cannot tell: assumed alive, never taken over early


def test_done_runs_are_never_claimed_and_failed_or_interrupted_ones_are(store):
    claim = store.claim("r1")
    assert store.finish("r1", {"test_accuracy": 0.9}, claim)
    _set(store, "r1", heartbeat=0.0)  # even with an ancient heartbeat
    assert store.claim("r1") is None
    for status in ("failed", "interrupted"):
        _set(store, "r2", status=status, owner=owner_id("x"), heartbeat=time.time())
        attempts = _row(store, "r2")["attempts"]
        assert store.claim("r2") is not None, status
        assert _row(store, "r2")["attempts"] == attempts + 1


def test_a_claim_taken_over_can_no_longer_heartbeat_finish_or_fail(store):
    first = store.claim("r1")
    _set(store, "r1", heartbeat=time.time() - STALE - 1)
    second = store.claim("r1")
    assert second != first and _row(store, "r1")["attempts"] == 2
    assert not store.heartbeat("r1", first) and not store.holds("r1", first)
    assert not store.finish("r1", {"test_accuracy": 0.1}, first)
    assert not store.fail("r1", "boom", first)
    row = _row(store, "r1")
    assert row["status"] == "running" and row["owner"] == second and row["metrics"] is None and row["error"] is None
    before = row["heartbeat"]
    time.sleep(0.01)
    assert store.heartbeat("r1", second) and store.holds("r1", second)
    assert _row(store, "r1")["heartbeat"] > before
    assert store.finish("r1", {"test_accuracy": 0.7}, second)
    row = _row(store, "r1")
    assert row["status"] == "done" and json.loads(row["metrics"]) == {"test_accuracy": 0.7}
    assert not store.heartbeat("r1", second)  # a done run has no claim to refresh


def test_fail_records_the_error_and_the_status(store):
    claim = store.claim("r2")
    assert store.fail("r2", "out of memory", claim, status="interrupted")
    row = _row(store, "r2")
    assert row["status"] == "interrupted" and row["error"] == "out of memory"
    claim = store.claim("r2")
    assert _row(store, "r2")["error"] is None  # a new attempt starts clean
    assert store.fail("r2", "boom", claim)
    assert _row(store, "r2")["status"] == "failed"


def test_without_a_token_any_claim_of_this_process_matches_and_no_other(store):
    claim = store.claim("r1")
    assert store.heartbeat("r1") and store.holds("r1")
    _set(store, "r1", owner=f"{owner_id()}0:{claim.split(':')[-1]}")  # another pid sharing this pid as a prefix
    assert not store.heartbeat("r1") and not store.holds("r1")


def test_a_heartbeat_exactly_stale_seconds_old_is_still_fresh(store, monkeypatch):
    import fuselab.experiments.store as module

    now = 1_000_000.0
    monkeypatch.setattr(module.time, "time", lambda: now)
    _set(store, "r1", status="running", owner=owner_id("other"), heartbeat=now - STALE)
    assert store.claim("r1") is None  # stale means strictly older than stale_seconds
    _set(store, "r1", heartbeat=now - STALE - 0.5)
    assert store.claim("r1") is not None


def test_unknown_run_names_itself_and_finish_publishes_the_staging_folder(store, tmp_path):
    with pytest.raises(KeyError, match="nope"):
        store.claim("nope")
    claim = store.claim("r1")
    store.run_dir("r1").parent.mkdir(parents=True, exist_ok=True)
    staging = store.root / "runs" / "r1.staging"
    staging.mkdir()
    (staging / "metrics.json").write_text("{}")
    assert store.finish("r1", {"test_accuracy": 0.5, "where": tmp_path / "x"}, claim, staging=staging)
    assert not staging.exists() and (store.run_dir("r1") / "metrics.json").is_file()
    assert json.loads(_row(store, "r1")["metrics"]) == {"test_accuracy": 0.5, "where": str(tmp_path / "x")}
