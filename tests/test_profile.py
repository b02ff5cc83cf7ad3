"""Profile: analytic FLOP counts, per-method cost figures, and the cost columns of the comparison table."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from fuselab.experiments.profile import module_flops, profile_spec, write_profile
from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import parse_spec
from fuselab.experiments.store import Store
from fuselab.layers.attention import MultiHeadAttention
from fuselab.report.experiment import build_report
from fuselab.report.plots import flops_per_sample

TINY = {
    "name": "tiny-profile",
    "base": {
        "data": {"name": "mfeat", "views": ["fou", "kar"]},
        "model": {"name": "mlp-streams", "hidden": 32},
        "train": {"epochs": 2, "batch_size": 64, "lr": 5.0e-3},
    },
    "grid": {"fusion.name": ["concat", "attention"]},
    "seeds": [0],
    "baseline": {"fusion.name": "concat"},
}


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
