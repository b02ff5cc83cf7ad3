"""A spec's ``evaluate:`` section and the report's transfer columns: ``fuselab compare`` scores every done run on
each named extra test set once (the accuracy recomputed by hand from the loaded run), and ``fuselab report`` shows
one column per set whose mean ± std, CI and tests equal a computation from the recorded evaluations."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tiny_spec
from typer.testing import CliRunner

from fuselab.cli import app, main
from fuselab.errors import ConfigError
from fuselab.experiments.evaluate import read_correct
from fuselab.experiments.spec import load_spec, parse_spec
from fuselab.experiments.store import Store
from fuselab.report.experiment import build_report
from fuselab.report.stats import holm, mcnemar, mean_ci, paired_ttest
from fuselab.report.tables import add_transfer, summarize, to_latex, to_markdown
from fuselab.train.session import load_run

SET = "split30"


def _spec(seeds=(0, 1)) -> dict:
    spec = tiny_spec("transfer", hidden=16, epochs=2, seeds=seeds, threads=1)
    spec["evaluate"] = {SET: {"data.test_fraction": 0.3}}
    return spec


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The tiny spec (concat and sum, seeds 0 and 1) trained and evaluated by ``fuselab compare``, twice."""
    root = tmp_path_factory.mktemp("transfer")
    path = root / "transfer.yaml"
    path.write_text(yaml.safe_dump(_spec()))
    store = root / "runs"
    cli = CliRunner()
    first = cli.invoke(app, ["compare", str(path), "--store", str(store), "--jobs", "1"])
    assert first.exit_code == 0, first.output
    stamps = {p: p.stat().st_mtime_ns for p in store.rglob(f"evaluations/{SET}.json")}
    second = cli.invoke(app, ["compare", str(path), "--store", str(store), "--jobs", "1"])
    assert second.exit_code == 0, second.output
    return path, store, first.output, second.output, stamps


def test_the_evaluate_section_is_checked_at_load_and_is_not_part_of_run_ids(tmp_path, capsys):
    spec = parse_spec(_spec(seeds=(0,)))
    assert spec.evaluate == {SET: {"data.test_fraction": 0.3}}
    plain = _spec(seeds=(0,))
    del plain["evaluate"]
    assert [r.run_id for r in spec.plan()] == [r.run_id for r in parse_spec(plain).plan()]
    nested = _spec(seeds=(0,))
    nested["evaluate"] = {"half": {"data": {"test_fraction": 0.5}}}
    assert parse_spec(nested).evaluate == {"half": {"data.test_fraction": 0.5}}
    for bad, words in (({"x": {"data.no_such_key": 1}}, "evaluate set 'x'"),
                       ({"../up": {"data.test_fraction": 0.3}}, "evaluate set name '../up'"),
                       ({"empty": {}}, "non-empty mapping"),
                       (["data.test_fraction=0.3"], "key 'evaluate' must map")):
        raw = _spec(seeds=(0,))
        raw["evaluate"] = bad
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
            parse_spec(raw)
    path = tmp_path / "bad.yaml"
    raw = _spec(seeds=(0,))
    raw["evaluate"] = {"x": {"data.no_such_key": 1}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exited:
        main(["compare", str(path), "--store", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "evaluate set 'x'" in err and "no_such_key" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # checked before the store is touched


def test_compare_evaluates_every_run_once_with_the_hand_computed_accuracy(compared):
    path, store, first, second, stamps = compared
    spec = load_spec(path)
    st = Store(store)
    plan = spec.plan()
    assert len(plan) == 4 and len(stamps) == 4  # every run (2 methods x 2 seeds) has the evaluation
    for planned in plan:
        folder = st.run_dir(planned.run_id)
        record = json.loads((folder / "evaluations" / f"{SET}.json").read_text())
        run = load_run(folder, ["data.test_fraction=0.3"])
        assert len(run.data.test.y) == 600  # 30 % of mfeat's 2000 samples
        pred = run.predict(run.data.test.x)
        expected = (pred == run.data.test.y).float().mean().item()
        assert record["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-6)
        assert record["n"] == 600 and record["name"] == SET and record["method"] == planned.method
        assert record["overrides"] == ["data.test_fraction=0.3"]
        correct = read_correct(folder, SET)
        assert correct.shape == (600,) and correct.mean() == pytest.approx(expected, abs=1e-6)
    assert first.count(f"evaluate {SET}:") == 4 and f"4 evaluations on {SET}" in first
    # the second compare trains nothing and evaluates nothing again
    assert "0 trained, 4 already in the store" in second and f"evaluate {SET}:" not in second
    assert f"0 evaluations on {SET}" in second
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def _records(store, spec):
    st = Store(store)
    out = {}
    for planned in spec.plan():
        folder = st.run_dir(planned.run_id)
        record = json.loads((folder / "evaluations" / f"{SET}.json").read_text())
        out[(planned.method, planned.seed)] = (record["metrics"]["accuracy"], read_correct(folder, SET))
    return out


def test_the_report_shows_the_transfer_column_computed_from_the_recorded_evaluations(compared):
    path, store, *_ = compared
    spec = load_spec(path)
    records = _records(store, spec)
    report = build_report(store, "transfer", plots=False, figure=False, pdf=False)
    markdown = report.files["markdown"].read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Method"))
    assert f"| {SET}: Accuracy (%) | ±CI |" in header
    cols = [c.strip() for c in header.strip("|").split("|")]
    at = cols.index(f"{SET}: Accuracy (%)")
    p_values = {}
    for method in ("concat", "sum"):
        values = np.array([records[(method, s)][0] for s in (0, 1)])
        mean, std = values.mean(), values.std(ddof=1)
        _, _, ci = mean_ci(values)
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {method} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[at].replace("*", "").split(" ▲")[0].split(" ▼")[0] == f"{mean * 100:.2f} ± {std * 100:.2f}"
        assert cells[at + 1] == f"±{ci * 100:.2f}"
        assert report.summary.set_index("method").at[method, f"transfer:{SET}_mean"] == pytest.approx(mean)
        if method == "sum":
            base = np.array([records[("concat", s)][0] for s in (0, 1)])
            p_values["t"] = paired_ttest(values, base)
            p_values["mc"] = mcnemar(np.concatenate([records[("sum", s)][1] for s in (0, 1)]),
                                     np.concatenate([records[("concat", s)][1] for s in (0, 1)]))
    row = report.summary.set_index("method").loc["sum"]
    # one compared method: Holm leaves its p-values as they are
    assert row[f"transfer:{SET}_p_ttest_holm"] == pytest.approx(p_values["t"], nan_ok=True)
    assert row[f"transfer:{SET}_p_mcnemar_holm"] == pytest.approx(p_values["mc"])
    assert f"Transfer columns ({SET})" in markdown
    latex = report.files["latex"].read_text()
    assert f"{SET}: Accuracy (\\%)" in latex and "Transfer columns" in latex
    html = report.files["html"].read_text()
    assert f"<th>{SET}: Accuracy (%)</th>" in html
    mean = np.mean([records[("sum", s)][0] for s in (0, 1)])
    assert f"{mean * 100:.2f} ± " in html


def test_runs_without_an_evaluation_are_stated_above_the_table(compared, tmp_path):
    import shutil

    path, store, *_ = compared
    copy = tmp_path / "runs"
    shutil.copytree(store, copy)
    spec = load_spec(path)
    folder = Store(copy).run_dir(next(r.run_id for r in spec.plan() if r.method == "sum" and r.seed == 1))
    (folder / "evaluations" / f"{SET}.json").unlink()
    report = build_report(copy, "transfer", plots=False, figure=False, pdf=False, html=False)
    assert any(f"Transfer column '{SET}' leaves out 1 finished run not evaluated on it: sum (seed 1)." in line
               for line in report.missing)
    markdown = report.files["markdown"].read_text()
    assert f"> Transfer column '{SET}' leaves out 1 finished run" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| sum |"))
    value = _records(store, spec)[("sum", 0)][0]
    assert f"{value * 100:.2f} (n = 1)" in row  # the one seed evaluated
    assert f"leaves out 1 finished run" in report.files["latex"].read_text()


def test_add_transfer_marks_a_method_the_tests_find_better_and_renders_it_everywhere():
    rng = np.random.default_rng(0)
    runs, evals = [], []
    for method, acc, far in (("a", 0.80, 0.50), ("b", 0.81, 0.90)):
        for seed in range(5):
            runs.append({"method": method, "seed": seed, "accuracy": acc + 0.001 * seed, "macro_f1": acc})
            correct = rng.random(400) < far
            evals.append({"method": method, "seed": seed, "accuracy": float(correct.mean()), "correct": correct})
    summary = summarize(pd.DataFrame(runs), baseline="a", metrics=["accuracy", "macro_f1"])
    out = add_transfer(summary, {"far": pd.DataFrame(evals)}, metric="accuracy")
    row = out.set_index("method").loc["b"]
    b = [e["accuracy"] for e in evals if e["method"] == "b"]
    a = [e["accuracy"] for e in evals if e["method"] == "a"]
    assert row["transfer:far_mean"] == pytest.approx(np.mean(b))
    assert row["transfer:far_std"] == pytest.approx(np.std(b, ddof=1))
    assert row["transfer:far_n"] == 5 and row["transfer:far_delta"] == pytest.approx(np.mean(b) - np.mean(a))
    assert row["transfer:far_p_ttest_holm"] == pytest.approx(holm(np.array([paired_ttest(np.array(b), np.array(a))]))[0])
    assert bool(row["transfer:far_better"]) and not bool(row["transfer:far_worse"])
    assert math.isnan(out.set_index("method").at["a", "transfer:far_p_ttest_holm"])
    md = to_markdown(out, caption="c")
    line = next(x for x in md.splitlines() if x.startswith("| b |"))
    assert f"**{np.mean(b) * 100:.2f} ± {np.std(b, ddof=1) * 100:.2f}** ▲" in line
    assert "$^\\blacktriangle$" in next(x for x in to_latex(out, caption="c").splitlines() if x.startswith("    b"))
    # without the baseline's evaluation: statistics, no tests
    alone = add_transfer(summary, {"far": pd.DataFrame([e for e in evals if e["method"] == "b"])}, metric="accuracy")
    row = alone.set_index("method").loc["b"]
    assert row["transfer:far_mean"] == pytest.approx(np.mean(b)) and not bool(row["transfer:far_better"])
    assert math.isnan(alone.set_index("method").at["a", "transfer:far_mean"])
    assert "| a | 5 |" in to_markdown(alone, caption="c")
