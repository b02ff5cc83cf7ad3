"""Faults a sweep must survive with every run finished exactly once and no result lost: a worker killed by
PID, a killed parent, a live owner whose heartbeat went stale, Ctrl-C, damaged, emptied and read-only
databases, a done run whose folder was deleted; and bad command lines that must leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import parse_spec
from fuselab.experiments.store import DB_NAME, Store

from conftest import run_cli, tiny_spec

QUICK = tiny_spec("faults", hidden=16, epochs=2, baseline=False, threads=1)
# long enough to be caught mid-training on a loaded machine; a state is saved after every epoch
LONG = {**QUICK, "base": {**QUICK["base"], "train": {"epochs": 120, "batch_size": 64, "threads": 1,
                                                       "checkpoint_every": 0.0}}}


_cli = run_cli  # (exit code, stdout, stderr) of `fuselab ARGS`


def _spec_file(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / f"{spec['name']}-{len(spec['grid'].get('fusion.name', []))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _compare(spec_file: str, store: Path, jobs: int, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **popen.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "fuselab.cli", "compare", spec_file, "--store", str(store),
                             "--jobs", str(jobs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **popen)


def _proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, process group, state) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2]), fields[0]


def _workers(parent: int) -> list[int]:
    """The spawned worker processes of ``parent`` (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is None or stat[0] != parent or stat[2] == "Z":
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((s := _proc_stat(p)) is None or s[2] == "Z" for p in pids):
            return True
        time.sleep(0.1)
    return False


def _wait_for(condition, timeout: float = 300.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - the store may still be being created
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _training(store: Store, n: int):
    """Run ids of ``n`` runs that are running and have saved a training state, or None."""
    runs = [r for r in store.experiment_runs("faults") if r["status"] == "running"]
    ready = [r["run_id"] for r in runs if any((p / "resume.pt").is_file() for p in store.partial_dirs(r["run_id"]))]
    return ready if len(ready) >= n else None


def _finished_once(store: Store) -> dict[str, int]:
    """Every run done, whole, with no partial folder left; attempts per run."""
    runs = store.experiment_runs("faults")
    assert runs and all(r["status"] == "done" for r in runs), [(r["run_id"], r["status"], r["error"]) for r in runs]
    for r in runs:
        folder = store.run_dir(r["run_id"])
        assert json.loads((folder / "metrics.json").read_text())["test_accuracy"] == r["metrics"]["test_accuracy"]
    assert sorted(p.name for p in (store.root / "runs").iterdir()) == sorted(r["run_id"] for r in runs)
    return {r["run_id"]: r["attempts"] for r in runs}


@pytest.mark.slow
def test_a_worker_killed_by_pid_fails_only_its_run_which_is_retried_and_the_sweep_goes_on(tmp_path, data_root):
    store = Store(tmp_path / "store")
    sweep = _compare(_spec_file(tmp_path, LONG), store.root, jobs=2)
    try:
        _wait_for(lambda: _training(store, 2), what="two runs training")
        workers = _workers(sweep.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)  # what the OOM killer does
        out, err = sweep.communicate(timeout=900)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "BrokenProcessPool" not in err
    attempts = _finished_once(store)
    assert sorted(attempts.values()) == [1, 2]  # the sibling ran undisturbed, the victim once more
    victim = next(rid for rid, n in attempts.items() if n == 2)
    resumed = json.loads((store.run_dir(victim) / "attempts.json").read_text())
    assert resumed[-1]["first_epoch"] > 0  # from the state the killed worker saved
    assert "2 trained, 0 already in the store, 0 failed" in out and "faults: test accuracy" in out  # the report


@pytest.mark.slow
def test_workers_exit_when_the_sweep_process_is_killed(tmp_path, data_root):
    store = Store(tmp_path / "store")
    spec_file = _spec_file(tmp_path, LONG)
    sweep = _compare(spec_file, store.root, jobs=2, start_new_session=True)
    try:
        _wait_for(lambda: _training(store, 2), what="two runs training")
        workers = _workers(sweep.pid)
        assert len(workers) == 2
        os.kill(sweep.pid, signal.SIGKILL)  # only the parent
        sweep.wait(timeout=30)
        assert _gone(workers, timeout=10), "orphaned workers kept running"
    finally:
        try:
            os.killpg(sweep.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert {r["status"] for r in store.experiment_runs("faults")} == {"running"}  # owner dead: taken over next
    rerun = _compare(spec_file, store.root, jobs=2)
    out, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, err[-2000:]
    assert _finished_once(store) == {r["run_id"]: 2 for r in store.experiment_runs("faults")}


@pytest.mark.slow
def test_a_live_owner_with_a_stale_heartbeat_loses_the_run_and_publishes_nothing(tmp_path, data_root):
    single = {**LONG, "grid": {"fusion.name": ["concat"]}}
    store = Store(tmp_path / "store")
    spec_file = _spec_file(tmp_path, single)
    first = _compare(spec_file, store.root, jobs=1)
    try:
        (run_id,) = _wait_for(lambda: _training(store, 1), what="the run training")
        # to the second sweep every heartbeat is stale: it takes the run over from a live owner
        second = _compare(spec_file, store.root, jobs=1, env={"FUSELAB_STALE_SECONDS": "0"})
        out2, err2 = second.communicate(timeout=900)
        out1, err1 = first.communicate(timeout=900)
    finally:
        first.kill()
    assert first.returncode == 0 and second.returncode == 0, err1[-1000:] + err2[-1000:]
    assert _finished_once(store) == {run_id: 2}
    (attempt,) = json.loads((store.run_dir(run_id) / "attempts.json").read_text())
    assert attempt["owner"].split(":")[1] == str(second.pid)  # the published folder is the new owner's
    assert "1 trained, 0 already in the store" in out2
    assert "0 trained, 1 already in the store, 0 failed" in out1  # the old owner reported the new result
    assert store.experiment_runs("faults")[0]["error"] is None


@pytest.mark.slow
@pytest.mark.parametrize("jobs, how", [(1, "SIGINT to the group"), (2, "SIGINT to the group"),
                                       (2, "SIGTERM to the parent")])
def test_ctrl_c_marks_runs_interrupted_prints_one_line_and_the_next_sweep_resumes(tmp_path, data_root, jobs, how):
    store = Store(tmp_path / "store")
    spec_file = _spec_file(tmp_path, LONG)
    sweep = _compare(spec_file, store.root, jobs=jobs, start_new_session=True)
    try:
        running = _wait_for(lambda: _training(store, jobs), what="runs training")
        workers = _workers(sweep.pid)
        start = time.monotonic()
        if how == "SIGINT to the group":  # what a terminal sends to the foreground group on Ctrl-C
            os.killpg(sweep.pid, signal.SIGINT)
        else:  # what kill, systemd or a batch scheduler sends
            os.kill(sweep.pid, signal.SIGTERM)
        out, err = sweep.communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        try:
            os.killpg(sweep.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert sweep.returncode == 130 and took < 10
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: ")
    assert _gone(workers, timeout=5)
    statuses = {r["run_id"]: r["status"] for r in store.experiment_runs("faults")}
    assert {statuses[rid] for rid in running} == {"interrupted"}
    rerun = _compare(spec_file, store.root, jobs=jobs)
    out, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, err[-2000:]
    _finished_once(store)
    for rid in running:  # resumed from the interrupted attempt's saved state
        assert json.loads((store.run_dir(rid) / "attempts.json").read_text())[-1]["first_epoch"] > 0


# -- damaged stores ---------------------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path, data_root):
    """A store with the two QUICK runs done, and the spec file."""
    store = Store(tmp_path / "store")
    plan = prepare(parse_spec(QUICK), store)
    assert sorted(o.status for o in execute_plan(plan, store, jobs=1)) == ["done", "done"]
    return store, _spec_file(tmp_path, QUICK)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_database_is_one_line_with_the_way_out_and_folders_are_recovered(finished, capsys, damage):
    store, spec_file = finished
    if damage == "garbage":
        store.db_path.write_bytes(b"this is not a database" * 100)
    else:
        with sqlite3.connect(store.db_path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = store.db_path.stat().st_size
        with store.db_path.open("r+b") as f:
            f.truncate(size // 3)
    for args in (["report", "faults"], ["runs", "list"], ["compare", spec_file, "--jobs", "1"]):
        code, _, err = _cli(capsys, *args, "--store", str(store.root))
        assert code == 2, (args, err)
        (line,) = err.strip().splitlines()
        assert "is damaged" in line and "mv " in line, line
    # the way out: move it aside; the finished run folders are registered again, nothing retrains
    store.db_path.rename(store.db_path.with_name(DB_NAME + ".damaged"))
    code, out, err = _cli(capsys, "compare", spec_file, "--store", str(store.root), "--jobs", "1")
    assert code == 0, err
    assert "0 trained, 2 already in the store" in out


def test_an_empty_database_is_not_silently_recreated(finished, capsys):
    store, spec_file = finished
    store.db_path.write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        store.db_path.with_name(DB_NAME + suffix).unlink(missing_ok=True)
    code, _, err = _cli(capsys, "compare", spec_file, "--store", str(store.root), "--jobs", "1")
    assert code == 2 and "empty (0 bytes)" in err and len(err.strip().splitlines()) == 1
    assert store.db_path.stat().st_size == 0  # left as found: nothing retrains behind the user's back


def test_a_read_only_store_can_be_listed_but_not_trained_into(finished):
    store, spec_file = finished
    with sqlite3.connect(store.db_path) as conn:  # a copied or archived store: no -wal / -shm beside it
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shared = Path(tempfile.mkdtemp(prefix="fuselab-ro-", dir="/tmp"))
    try:
        copy = shared / "store"
        shutil.copytree(store.root, copy, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
        shutil.copy(spec_file, shared / "spec.yaml")
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        env = {**os.environ, "HOME": str(shared), "MPLCONFIGDIR": str(shared), "OMP_NUM_THREADS": "1"}

        def fuselab(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([*as_user, sys.executable, "-m", "fuselab.cli", *args, "--store", str(copy)],
                                  capture_output=True, text=True, timeout=300, env=env)

        listed = fuselab("runs", "list", "--experiment", "faults")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count(" done ") == 2 or listed.stdout.count("done") >= 2
        assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in store.root.iterdir()
                                                                if not p.name.endswith(("-wal", "-shm")))
        trained = fuselab("compare", str(shared / "spec.yaml"), "--jobs", "1")
        assert trained.returncode == 2 and len(trained.stderr.strip().splitlines()) == 1
        assert "read-only" in trained.stderr or "cannot be written" in trained.stderr
    finally:
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(shared)


def test_a_done_run_whose_folder_was_deleted_is_reported_and_retrained_on_request(finished, capsys):
    store, spec_file = finished
    kept, lost = (r["run_id"] for r in store.experiment_runs("faults"))  # the baseline's run is kept
    shutil.rmtree(store.run_dir(lost))
    code, out, _ = _cli(capsys, "runs", "list", "--store", str(store.root), "--status", "missing")
    assert code == 0 and lost in out and kept not in out
    code, out, err = _cli(capsys, "report", "faults", "--store", str(store.root), "--no-html", "--no-flops")
    assert code == 0, err  # the report is written from the runs that are whole, and says what is missing
    assert "| concat | 1 |" in out and "| sum |" not in out
    assert "1 runs are done in the store but their folders are missing" in out
    code, out, err = _cli(capsys, "compare", spec_file, "--store", str(store.root), "--jobs", "1")
    assert code == 0, err
    assert "0 trained, 1 already in the store" in out and "--status missing" in out
    assert not store.run_dir(lost).exists()  # not retrained unasked
    code, out, _ = _cli(capsys, "runs", "retry", "--store", str(store.root), "--status", "missing", "--yes")
    assert code == 0 and "1 runs reset" in out
    code, out, err = _cli(capsys, "compare", spec_file, "--store", str(store.root), "--jobs", "1")
    assert code == 0 and "1 trained, 1 already in the store" in out, err
    assert _finished_once(store) == {lost: 2, kept: 1}


# -- bad command lines: one line, exit 2, nothing left behind ------------------------------------


def test_jobs_zero_is_refused(tmp_path, capsys):
    code, _, err = _cli(capsys, "compare", _spec_file(tmp_path, QUICK), "--store", str(tmp_path / "s"), "--jobs", "0")
    assert code == 2 and "--jobs must be at least 1, got 0" in err
    assert not (tmp_path / "s").exists()


def test_an_unknown_method_leaves_no_pending_rows(tmp_path, capsys):
    code, _, err = _cli(capsys, "compare", _spec_file(tmp_path, QUICK), "--store", str(tmp_path / "s"),
                        "--methods", "nosuch")
    assert code == 2 and "'nosuch' is not a method of faults" in err
    assert not (tmp_path / "s").exists()


def test_an_encoder_with_the_wrong_output_is_one_line_and_leaves_no_folder(tmp_path, capsys, data_root):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "mfeat", "views": ["fou", "kar"]},
        "model": {"name": "custom-streams", "encoders": {"*": {"target": "torch.nn.Linear", "in_features": 3,
                                                                "out_features": 4}}},
        "train": {"epochs": 1, "threads": 1},
    }))
    code, _, err = _cli(capsys, "run", str(config), "--out", str(tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "encoder of 'fou' (torch.nn.Linear) fails on an input of shape (2, 76)" in err
    assert not (tmp_path / "out").exists()


def test_a_model_too_large_for_memory_is_one_line_and_leaves_no_folder(tmp_path, capsys, data_root):
    code, _, err = _cli(capsys, "run", "data.views=[fou,kar]", "model.hidden=1000000000", "train.epochs=1",
                        "train.threads=1", "--out", str(tmp_path / "out"))
    assert code == 2 and "does not fit in memory" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _bad_files(folder: Path) -> dict[str, Path]:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 5)).astype("float32"), rng.normal(size=(60, 3)).astype("float32")
    a[3, 2] = np.nan
    files = {"nan": folder / "nan.npz", "npz": folder / "corrupt.npz", "pt": folder / "corrupt.pt",
             "yaml": folder / "latin1.yaml"}
    np.savez(files["nan"], a=a, b=b, y=rng.integers(0, 3, 60))
    files["npz"].write_bytes(b"PK\x03\x04" + b"not a zip" * 20)
    files["pt"].write_bytes(b"\x80\x02" + b"not a pickle" * 20)
    files["yaml"].write_bytes("train:\n  epochs: 1  # première\n".encode("latin-1"))
    return files


@pytest.mark.parametrize("case, expected", [
    ("nan", "array 'a' in '{file}' has 1 NaN or infinite values"),
    ("npz", "data.path '{file}' cannot be read as .npz"),
    ("pt", "data.path '{file}' cannot be read as .pt (damaged, or holds more than tensors"),
    ("yaml", "'{file}' is not UTF-8 text"),
])
def test_bad_data_and_config_files_are_one_line_naming_the_file(tmp_path, capsys, case, expected):
    file = _bad_files(tmp_path)[case]
    args = [str(file)] if case == "yaml" else [f"data.name=tensors", f"data.path={file}", "train.epochs=1"]
    code, _, err = _cli(capsys, "run", *args, "--out", str(tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert expected.format(file=file) in err
    assert not (tmp_path / "out").exists()


def test_the_heartbeat_keeps_a_claim_fresh_through_an_epoch_longer_than_the_staleness_limit(tmp_path):
    from fuselab.experiments.runner import _Heartbeat

    store = Store(tmp_path / "store", stale_seconds=4.0)
    store.init()
    store.register_experiment("hb", {}, "a", "accuracy", [("r1", "a", 0, {"seed": 0})])
    claim = store.claim("r1")
    rival = Store(tmp_path / "store", stale_seconds=4.0)
    beat = _Heartbeat(store, "r1", claim)  # a beat every second at this limit
    try:
        time.sleep(6.0)  # one "epoch" longer than the limit, without any epoch-end callback
        assert rival.claim("r1") is None  # still fresh: nobody may take it over
        assert not beat.lost.is_set()
        with store.transaction() as conn:  # now the rival finds it stale (e.g. the process was stopped)
            conn.execute("UPDATE runs SET heartbeat=0 WHERE id='r1'")
        taken = rival.claim("r1")
        assert taken is not None and taken != claim
        deadline = time.monotonic() + 5
        while not beat.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert beat.lost.is_set()  # the old owner learns it lost the run ...
        assert not store.finish("r1", {"test_accuracy": 0.0}, claim)  # ... and can no longer publish
        assert not store.fail("r1", "late failure", claim)
        assert store.status("r1") == "running" and store.finish("r1", {"test_accuracy": 1.0}, taken)
    finally:
        beat.stop()
