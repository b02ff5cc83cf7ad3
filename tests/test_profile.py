"""Profile: analytic FLOP counts, per-method cost figures with the spread of latencies, the store it is written to,
and the cost columns of the comparison table."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pandas as pd
import pytest
import torch
from torch import nn

from fuselab.cli import main
from fuselab.experiments.profile import module_flops, profile_spec, quartiles, spread_warnings, write_profile
from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import parse_spec
from fuselab.experiments.store import Store
from fuselab.layers.attention import MultiHeadAttention
from fuselab.report.experiment import build_report
from fuselab.report.plots import flops_per_sample

from conftest import tiny_spec

TINY = tiny_spec("tiny-profile", epochs=2, grid=("concat", "attention"), lr=5.0e-3)


def test_flops_of_a_linear_layer_match_the_analytic_count():
    b, d_in, d_out = 4, 16, 8
    assert module_flops(nn.Linear(d_in, d_out), torch.randn(b, d_in)) == 2 * b * d_in * d_out


def test_flops_of_an_attention_block_match_the_analytic_count():
    b, n, d, h = 2, 10, 32, 4
    block = MultiHeadAttention(d, heads=h)
    projections = 4 * 2 * b * n * d * d  # q, k, v and output projections
    scores = 2 * b * h * n * n * (d // h)  # Q K^T
    mix = 2 * b * h * n * n * (d // h)  # softmax(.) V
    assert module_flops(block, torch.randn(b, n, d)) == projections + scores + mix
    s = 7  # cross-attention to a longer key/value sequence
    cross = 2 * 2 * b * n * d * d + 2 * 2 * b * s * d * d + 2 * 2 * b * h * n * s * (d // h)
    assert module_flops(block, torch.randn(b, n, d), torch.randn(b, s, d), torch.randn(b, s, d)) == cross


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile") / "store"
    spec, store = parse_spec(json.loads(json.dumps(TINY))), Store(root)
    outcomes = execute_plan(prepare(spec, store), store, jobs=1)
    assert [o.status for o in outcomes] == ["done", "done"]
    return spec, store


def test_every_run_records_params_and_flops(swept):
    spec, store = swept
    for run in store.experiment_runs(spec.name):
        metrics = run["metrics"]
        assert metrics["params"] > 0 and metrics["flops"] == flops_per_sample(run["config"])
        assert json.loads((store.run_dir(run["run_id"]) / "flops.json").read_text())["flops_per_sample"] == metrics["flops"]


def test_profile_figures_and_the_comparison_table_columns(swept):
    spec, store = swept
    frame = profile_spec(spec, store=store.root, device="cpu", warmup=1, repeat=3)
    assert list(frame["method"]) == ["concat", "attention"]
    runs = {r["method"]: r for r in store.experiment_runs(spec.name)}
    for row in frame.itertuples(index=False):
        assert row.params == runs[row.method]["metrics"]["params"]
        assert row.flops == runs[row.method]["metrics"]["flops"]
        assert row.latency_b1_ms > 0 and row.latency_b64_ms > 0 and row.peak_mem_mb >= 0
    files = write_profile(frame, store.root, spec.name)
    assert "Latency b64 (ms)" in files["markdown"].read_text()
    report = build_report(store.root, spec.name, plots=False, figure=False, html=False)
    header = [line for line in report.markdown.splitlines() if line.startswith("| Method")][0]
    for column in ("Params", "FLOPs", "Latency b1 (ms)", "Latency b64 (ms)", "Peak mem. (MB)"):
        assert column in header
    csv = pd.read_csv(report.files["csv"])
    assert {"params", "flops", "latency_b1_ms", "latency_b64_ms", "peak_mem_mb"} <= set(csv.columns)
    assert csv["flops"].notna().all()
    assert "FLOPs" in report.files["latex"].read_text()


def test_quartiles_by_hand():
    assert quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (2.0, 3.0, 4.0)
    assert quartiles([1.0, 2.0, 3.0, 4.0]) == (1.75, 2.5, 3.25)  # linear interpolation, as numpy.percentile
    assert quartiles([7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match="no times"):
        quartiles([])


def test_a_large_latency_spread_is_warned_about_and_a_small_one_is_not():
    frame = pd.DataFrame([
        {"method": "steady", "latency_b1_ms": 1.0, "latency_b1_ms_q1": 0.9, "latency_b1_ms_q3": 1.1,
         "latency_b64_ms": 4.0, "latency_b64_ms_q1": 3.9, "latency_b64_ms_q3": 4.1},
        {"method": "busy", "latency_b1_ms": 1.0, "latency_b1_ms_q1": 0.5, "latency_b1_ms_q3": 2.0,
         "latency_b64_ms": 4.0, "latency_b64_ms_q1": 3.9, "latency_b64_ms_q3": 4.1},
    ])
    warnings = spread_warnings(frame)
    assert len(warnings) == 1
    assert warnings[0].startswith("busy: latency at batch 1 is unsteady, interquartile range 0.500–2.000 ms around "
                                  "a median of 1.000 ms (150 % of it, above 25 %)")
    assert spread_warnings(frame, limit=2.0) == []


def test_profile_rows_carry_the_quartiles_of_their_latencies(swept):
    spec, store = swept
    frame = profile_spec(spec, store=store.root, device="cpu", warmup=1, repeat=7)
    for row in frame.itertuples(index=False):
        for b in (1, 64):
            q1, median, q3 = (getattr(row, f"latency_b{b}_ms{s}") for s in ("_q1", "", "_q3"))
            assert 0 < q1 <= median <= q3


def _run_cli(*args: str) -> str:
    buffer = io.StringIO()
    with pytest.raises(SystemExit) as info, contextlib.redirect_stdout(buffer):
        main(list(args))
    assert info.value.code in (0, None), buffer.getvalue()[-2000:]
    return buffer.getvalue()


def test_profile_cli_writes_median_and_spread_to_the_experiments_store(swept, tmp_path, monkeypatch):
    spec, store = swept
    spec_file = tmp_path / "tiny-profile.yaml"
    spec_file.write_text(json.dumps(TINY))
    monkeypatch.chdir(tmp_path)  # a stray ./runs would show here
    printed = _run_cli("profile", str(spec_file), "--store", str(store.root), "--device", "cpu", "--threads", "1",
                       "--repeat", "5", "--warmup", "1")
    written = store.root / "tiny-profile" / "profile"
    assert (written / "profile.csv").is_file() and not (tmp_path / "runs").exists()
    assert "holds no experiment" not in printed
    md = (written / "profile.md").read_text(encoding="utf-8")
    assert "latency = median [interquartile range] of 5 forward passes after 1 warm-up" in md
    rows = [line for line in md.splitlines() if line.startswith("| concat") or line.startswith("| attention")]
    cell = r"\d+\.\d{3} \[\d+\.\d{3}–\d+\.\d{3}\]"
    assert len(rows) == 2 and all(re.search(rf"\| {cell} \| {cell} \|", row) for row in rows)
    csv = pd.read_csv(written / "profile.csv")
    assert {"latency_b1_ms_q1", "latency_b1_ms_q3", "latency_b64_ms_q1", "latency_b64_ms_q3"} <= set(csv.columns)
    # the comparison report of that store shows the spread in its cost cells and says what it is
    report = build_report(store.root, spec.name, plots=False, figure=False, html=False)
    assert re.search(rf"\| {cell} \| {cell} \|", report.markdown)
    assert "Latency: median over repeated forward passes [interquartile range]." in report.markdown


def test_profile_cli_says_when_the_store_does_not_hold_the_experiment(tmp_path, monkeypatch):
    spec_file = tmp_path / "tiny-profile.yaml"
    spec_file.write_text(json.dumps({**TINY, "grid": {"fusion.name": ["concat"]}}))
    monkeypatch.chdir(tmp_path)
    printed = _run_cli("profile", str(spec_file), "--device", "cpu", "--threads", "1", "--repeat", "3", "--warmup", "0")
    assert "the store 'runs' holds no experiment 'tiny-profile' yet: profiled from the spec" in printed
    assert "--store set to the folder where the experiment is" in printed
    assert (tmp_path / "runs" / "tiny-profile" / "profile" / "profile.csv").is_file()
