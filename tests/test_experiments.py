"""Specs, the store, resumable sweeps and the comparison report, on small real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

import fuselab
from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import load_spec, parse_spec, run_id
from fuselab.experiments.store import Store
from fuselab.train.config import ConfigError, make_config

from conftest import run_cli, tiny_spec

TINY = tiny_spec(variants=[{"name": "lmf-r2", "fusion": {"name": "lmf", "rank": 2}}], seeds=(0, 1), lr=5.0e-3)


def _spec(**changes):
    raw = json.loads(json.dumps(TINY))
    raw.update(changes)
    return parse_spec(raw)


def test_spec_expands_grid_and_variants_and_resolves_the_baseline():
    spec = _spec()
    assert [m.name for m in spec.methods] == ["concat", "sum", "lmf-r2"]
    assert spec.methods[2].overrides == {"fusion.name": "lmf", "fusion.rank": 2}
    assert spec.baseline == "concat"
    plan = spec.plan()
    assert len(plan) == 6 and len({r.run_id for r in plan}) == 6
    assert plan[0].config.fusion.name == "concat" and plan[0].config.data.views == ["fou", "kar"]


def test_run_id_ignores_execution_details_but_not_the_seed():
    a = make_config(None, ["train.threads=1"])
    b = make_config(None, ["train.threads=2", "train.tensorboard=true"])
    c = make_config(None, ["seed=1"])
    assert run_id(a) == run_id(b) != run_id(c)


def test_shipped_default_spec_plans_fourteen_operators_on_three_seeds():
    spec = load_spec("mfeat-compare")
    assert len(spec.methods) == 14 and spec.seeds == [0, 1, 2] and spec.baseline == "concat"
    assert {m.name for m in spec.methods} == set(fuselab.list_fusions("*")) & {m.name for m in spec.methods}


def test_every_shipped_spec_plans_with_checked_configs():
    from fuselab.experiments.spec import shipped_specs

    names = sorted(shipped_specs())
    assert {"mfeat-compare", "cen-ablation", "mfeat-dropout", "landsat-cd-compare", "mbt-ablation"} <= set(names)
    for name in names:
        spec = load_spec(name)
        plan = spec.plan()  # every method x seed config resolves and passes the option checks
        assert len({r.run_id for r in plan}) == len(spec.methods) * len(spec.seeds), name
        assert spec.baseline in {m.name for m in spec.methods}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The TINY experiment, swept in two halves as an interrupted sweep and its re-run would."""
    root = tmp_path_factory.mktemp("finished") / "store"
    spec, store = _spec(), Store(root)
    plan = prepare(spec, store)
    first = execute_plan(plan[:3], store, jobs=1)  # an interrupted sweep: half the runs
    second = execute_plan(plan, store, jobs=1)
    return spec, store, plan, first, second


def test_sweep_resumes_without_training_twice(finished):
    spec, store, plan, first, second = finished
    assert [o.status for o in first] == ["done"] * 3
    assert sorted(o.status for o in second) == ["cached"] * 3 + ["done"] * 3
    third = execute_plan(plan, store, jobs=1)
    assert [o.status for o in third] == ["cached"] * 6
    runs = store.experiment_runs("tiny")
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in runs)
    assert sorted(p.name for p in (store.root / "runs").iterdir()) == sorted(r.run_id for r in plan)


def test_a_run_killed_mid_training_is_taken_over_and_a_live_claim_is_respected(tmp_path):
    spec, store = _spec(seeds=[0]), Store(tmp_path / "store")
    plan = prepare(spec, store)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    with store.transaction() as conn:  # as a killed sweep leaves it: running, owner gone, half a folder
        conn.execute("UPDATE runs SET status='running', owner=?, heartbeat=strftime('%s','now') WHERE id=?",
                     (f"{socket.gethostname()}:{dead.stdout.strip()}", plan[0].run_id))
        conn.execute("UPDATE runs SET status='running', owner=?, heartbeat=strftime('%s','now') WHERE id=?",
                     (f"{socket.gethostname()}:{os.getppid()}", plan[1].run_id))  # a live process holds it
    store.staging_dir(plan[0].run_id).mkdir(parents=True)
    outcomes = {o.run_id: o.status for o in execute_plan(plan, store, jobs=1, wait=False)}
    assert outcomes[plan[0].run_id] == "done"
    assert outcomes[plan[1].run_id] == "skipped"
    assert store.status(plan[1].run_id) == "running"


def test_failed_runs_are_recorded_and_retried(tmp_path, monkeypatch):
    spec, store = _spec(seeds=[0]), Store(tmp_path / "store")
    plan = prepare(spec, store)
    import fuselab.train.run as run_module

    real = run_module.execute

    def broken(cfg, *a, **k):
        if cfg.fusion.name == "sum":
            raise RuntimeError("out of memory")
        return real(cfg, *a, **k)

    monkeypatch.setattr(run_module, "execute", broken)
    outcomes = {o.method: o for o in execute_plan(plan, store, jobs=1)}
    assert outcomes["sum"].status == "failed" and "out of memory" in outcomes["sum"].error
    assert outcomes["concat"].status == "done"
    assert not any(p.name.startswith(".partial") for p in (tmp_path / "store" / "runs").iterdir())
    monkeypatch.setattr(run_module, "execute", real)
    retry = {o.method: o.status for o in execute_plan(plan, store, jobs=1)}
    assert retry == {"concat": "cached", "sum": "done", "lmf-r2": "cached"}


def test_load_results_and_report_files(finished):
    store = finished[1]
    frame = fuselab.load_results(store.root, "tiny")
    assert len(frame) == 6 and set(frame["method"]) == {"concat", "sum", "lmf-r2"}
    assert frame["status"].eq("done").all() and frame["test_accuracy"].between(0.85, 1.0).all()
    assert (frame["params"] > 0).all() and set(frame["seed"]) == {0, 1}
    from fuselab.report.experiment import build_report

    report = build_report(store.root, "tiny")
    assert list(report.summary["method"]) == ["concat", "sum", "lmf-r2"]
    assert report.summary.loc[0, "accuracy_mean"] == pytest.approx(frame[frame.method == "concat"]["test_accuracy"].mean())
    for kind in ("markdown", "latex", "csv"):
        assert report.files[kind].is_file() and report.files[kind].parent == store.root / "tiny" / "report"
    assert "\\toprule" in report.files["latex"].read_text()


_cli = run_cli  # (exit code, stdout, stderr) of `fuselab ARGS`


def _write(tmp_path, raw, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw) if isinstance(raw, dict) else raw)
    return str(path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"grid": {"fusion.nme": ["concat"]}}, "unknown config key 'fusion.nme'"),
        ({"grid": {"train.epoch": [1]}}, "unknown config key 'train.epoch'"),
        ({"variants": [{"fusion": {"name": "lmf"}}]}, "spec variant 1 has no name"),
        ({"baseline": {"fusion.name": "max"}}, "baseline {'fusion.name': 'max'} matches no method"),
        ({"baseline": "nope"}, "baseline 'nope' matches no method; methods are: concat, sum, lmf-r2"),
    ],
)
def test_bad_spec_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, change, message):
    raw = json.loads(json.dumps(TINY))
    raw.update(change)
    store = tmp_path / "store"
    code, out, err = _cli(capsys, "compare", _write(tmp_path, raw), "--store", str(store))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not store.exists()


def test_unknown_spec_name_and_invalid_yaml(tmp_path, capsys):
    code, _, err = _cli(capsys, "compare", "mfeat-compar", "--store", str(tmp_path / "s"))
    assert code == 2 and "unknown spec 'mfeat-compar'; did you mean 'mfeat-compare'" in err
    code, _, err = _cli(capsys, "compare", _write(tmp_path, "name: x\nbase: {data: [\n"), "--store", str(tmp_path / "s"))
    assert code == 2 and "is not valid YAML" in err
    assert not (tmp_path / "s").exists()


def test_store_path_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = _cli(capsys, "compare", _write(tmp_path, TINY), "--store", str(blocker / "store"))
    assert code == 2 and "is not a folder" in err


def test_older_schema_is_refused_with_a_way_forward(tmp_path):
    store = Store(tmp_path / "s")
    store.init()
    with store.transaction() as conn:
        conn.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
    with pytest.raises(ConfigError, match="schema version 0.*use a new --store folder"):
        store.init()


def test_report_of_unknown_experiment(tmp_path, capsys):
    store = Store(tmp_path / "s")
    store.init()
    code, _, err = _cli(capsys, "report", "nothing", "--store", str(tmp_path / "s"))
    assert code == 2 and "unknown experiment 'nothing'" in err


def test_compare_cli_in_two_processes_then_cached(tmp_path):
    spec = _write(tmp_path, {**TINY, "variants": [], "seeds": [0]})
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "fuselab.cli", "compare", spec, "--store", str(store), "--jobs", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "2 trained" in first.stdout and "(baseline)" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "0 trained, 2 already in the store" in second.stdout
    table = lambda out: out[out.index("tiny: test accuracy"):out.index("tables:")]  # noqa: E731
    assert table(first.stdout) == table(second.stdout)


def test_runs_list_delete_retry(tmp_path, capsys, finished):
    import shutil

    shutil.copytree(finished[1].root, tmp_path / "store")
    store = Store(tmp_path / "store")
    plan = [r for r in finished[2] if r.seed == 0]
    store.register_experiment("tiny", {}, "concat", "accuracy",
                              [(r.run_id, r.method, r.seed, {}) for r in plan])
    code, out, _ = _cli(capsys, "runs", "list", "--store", str(tmp_path / "store"), "--experiment", "tiny")
    assert code == 0 and all(r.run_id in out for r in plan) and "tiny: lmf-r2 / 0" in out
    target = plan[1].run_id
    code, out, _ = _cli(capsys, "runs", "retry", "--store", str(tmp_path / "store"), "--status", "done",
                        "--id", target[:6], "--yes")
    assert code == 0 and "1 runs reset" in out
    assert store.status(target) == "pending" and not store.run_dir(target).exists()
    assert sorted(o.status for o in execute_plan(plan, store, jobs=1)) == ["cached", "cached", "done"]
    code, out, _ = _cli(capsys, "runs", "delete", "--store", str(tmp_path / "store"), "--id", target, "--yes")
    assert code == 0 and store.status(target) is None and not store.run_dir(target).exists()
    code, _, err = _cli(capsys, "runs", "list", "--store", str(tmp_path / "store"), "--status", "finished")
    assert code == 2 and "--status must be pending, running, done or failed" in err


def test_keys_added_later_leave_old_run_ids_alone_at_their_neutral_values():
    from fuselab.experiments.spec import NEUTRAL_DEFAULTS

    base = make_config(None, ["fusion.name=sum"])
    for key, neutral in NEUTRAL_DEFAULTS.items():
        assert run_id(make_config(None, ["fusion.name=sum", f"{key}={neutral[0]}"])) == run_id(base)
    assert run_id(make_config(None, ["fusion.name=sum", "train.strategy=ddp"])) != run_id(base)


def test_compare_can_train_only_some_methods(tmp_path, capsys):
    spec = _write(tmp_path, {**TINY, "seeds": [0]})
    code, out, _ = _cli(capsys, "compare", spec, "--store", str(tmp_path / "s"), "--jobs", "1", "--methods", "concat, lmf-r2")
    assert code == 0 and "2 trained" in out
    methods = {r["method"] for r in Store(tmp_path / "s").experiment_runs("tiny") if r["status"] == "done"}
    assert methods == {"concat", "lmf-r2"}  # sum was left for later
    code, _, err = _cli(capsys, "compare", spec, "--store", str(tmp_path / "s"), "--methods", "nope")
    assert code == 2 and "'nope' is not a method of tiny; methods are concat, sum, lmf-r2" in err


def test_compare_of_methods_without_the_baseline_keeps_its_runs_and_says_the_table_waits(tmp_path, capsys):
    raw = {**TINY, "grid": {"fusion.name": ["concat", "sum"]}, "seeds": [0], "baseline": {"fusion.name": "concat"}}
    spec, store = _write(tmp_path, raw), tmp_path / "store"
    code, out, err = _cli(capsys, "compare", spec, "--store", str(store), "--jobs", "1", "--methods", "sum")
    assert code in (0, None), err
    assert f"no table yet: the baseline 'concat' has no finished run; train it with `fuselab compare {spec} " \
           f"--store {store} --methods concat`" in " ".join(out.split())
    frame = fuselab.load_results(store, raw["name"])
    assert frame.set_index("method").loc["sum", "status"] == "done"
    assert frame.set_index("method").loc["concat", "status"] == "pending"
