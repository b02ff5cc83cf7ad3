"""Paper-ready output on a small real experiment: plots, the network figure, the HTML report, LaTeX, the journal."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from conftest import run_cli

from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import parse_spec
from fuselab.experiments.store import Store
from fuselab.report.experiment import build_report
from fuselab.report.figure import describe, draw, sketch
from fuselab.report.journal import build_journal, parse_since
from fuselab.report.plots import ablation_axes, flops_per_sample
from fuselab.train.config import ConfigError, make_config

# two fusions x two widths (a two-parameter ablation) x two seeds, plus a variant whose run fails
SPEC = {
    "name": "tiny-report",
    "base": {
        "data": {"name": "mfeat", "views": ["fou", "zer"]},
        "model": {"name": "mlp-streams", "hidden": 16},
        "train": {"epochs": 2, "batch_size": 128},
    },
    "grid": {"fusion.name": ["concat", "sum"], "model.hidden": [8, 16]},
    "variants": [{"name": "lmf-r2", "fusion": {"name": "lmf", "rank": 2}}],
    "seeds": [0, 1],
    "baseline": {"fusion.name": "concat", "model.hidden": 16},
}
DIMS = {"fou": 76, "zer": 47}


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "store"
    st = Store(root)
    plan = prepare(parse_spec(json.loads(json.dumps(SPEC))), st)
    execute_plan([r for r in plan if r.method != "lmf-r2"], st, jobs=1)
    failing = next(r for r in plan if r.method == "lmf-r2")
    st.claim(failing.run_id)
    st.fail(failing.run_id, "RuntimeError: out of memory\nTraceback ...")
    return root


@pytest.fixture(scope="session")
def report(store):
    return build_report(store, "tiny-report", flops=True, pdf=True)


def test_report_writes_tables_plots_figure_and_html(report, store):
    out = store / "tiny-report" / "report"
    for name in ("results.md", "results.tex", "results.csv", "report.md", "report.html", "network.svg", "network.pdf"):
        assert (out / name).is_file(), name
    for plot in ("accuracy_vs_params", "accuracy_vs_flops", "training_curves", "ablation_heatmap"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
        assert (out / "plots" / f"{plot}.pdf").read_bytes()[:5] == b"%PDF-", plot
    assert not (out / "plots" / "robustness.png").exists()  # no run has robustness results
    md = (out / "report.md").read_text()
    assert "![training_curves](plots/training_curves.png)" in md and "![network](network.svg)" in md
    assert "lmf-r2 (seed 0): RuntimeError: out of memory" in md and report.failed == 1


def test_flops_are_counted_once_and_cached_in_the_run_folder(report, store):
    # concat at the last stage, hidden 16: 2 x (76*16 + 16*16 + 47*16 + 16*16 + 32*10) multiply-adds
    st = Store(store)
    run = next(r for r in st.experiment_runs("tiny-report") if r["method"] == report.summary.attrs["baseline"])
    cached = json.loads((st.run_dir(run["run_id"]) / "flops.json").read_text())
    assert cached["flops_per_sample"] == 2 * (76 * 16 + 16 * 16 + 47 * 16 + 16 * 16 + 32 * 10)
    assert flops_per_sample(make_config(run["config"])) == cached["flops_per_sample"]


def test_html_report_is_one_self_contained_file(report):
    page = report.files["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and '<table id="results">' in page
    assert page.count("data:image/png;base64,") == 4 and "<svg" in page and "<?xml" not in page
    assert not re.search(r'(src|href)="(https?:|//|[^d#][^a:])', page)  # nothing loaded from elsewhere
    assert "<script" not in page
    for needle in ("concat", "lmf-r2", "git_revision", "versions.torch", "hardware.cpu_count", "model.hidden=8"):
        assert needle in page, needle
    assert 'class="best"' in page and 'class="second"' in page


def test_chinese_report_has_chinese_headings_and_keeps_numbers(store, report):
    zh = build_report(store, "tiny-report", lang="zh", plots=False, figure=False)
    text = zh.files["report"].read_text(encoding="utf-8")
    assert zh.files["report"].name == "report.zh.md" and zh.files["html"].name == "report.zh.html"
    assert text.startswith("# 对比实验报告：tiny-report") and "## 实验结果" in text and "| 方法 | 种子数 |" in text
    assert "测试准确率与宏平均 F1" in text and "（基线）" in text and "Values:" not in text
    numbers = lambda s: re.findall(r"\d+\.\d\d ± \d+\.\d\d", s)  # noqa: E731
    assert numbers(text) == numbers(report.markdown)
    assert "lang=\"zh-CN\"" in zh.files["html"].read_text(encoding="utf-8")


def test_latex_table_cells_marks_and_note(report):
    tex = report.files["latex"].read_text()
    assert re.search(r"\\textbf\{\d+\.\d\d\} \$\\pm\$ \d+\.\d\d", tex)
    assert re.search(r"\\underline\{\d+\.\d\d\} \$\\pm\$ \d+\.\d\d", tex)
    assert "best in bold, second best underlined" in tex and "Holm correction" in tex


def test_latex_table_compiles(report, tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed: no TeX installation to compile the table with")
    doc = tmp_path / "table.tex"
    # the packages the table's first line names, and nothing to map a Unicode ± (the table has none)
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{amssymb}\n\\usepackage{graphicx}\n"
                   "\\begin{document}\n" + report.files["latex"].read_text() + "\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "Overfull \\hbox" not in (tmp_path / "table.log").read_text(errors="replace")
    assert (tmp_path / "table.pdf").stat().st_size > 1000


@pytest.mark.parametrize(
    "overrides,merge_at,stages,trunk,late",
    [
        ([], [1], 2, 0, False),
        (["model.fuse_at=early", "model.layers=3"], [-1], 0, 3, False),
        (["model.fuse_at=0", "model.layers=3", "fusion.name=lmf", "fusion.rank=4"], [0], 1, 2, False),
        (["fusion.name=late"], [1], 2, 0, True),
    ],
)
def test_figure_describes_where_and_how_streams_merge(overrides, merge_at, stages, trunk, late):
    diagram = describe(make_config({"data": {"name": "mfeat", "views": ["fou", "zer"]}}, overrides), dims=DIMS, num_classes=10)
    assert list(diagram.lanes) == ["fou", "zer"] and diagram.merge_at == merge_at
    assert all(len(s) == stages for _, s in diagram.lanes.values()) and len(diagram.trunk) == trunk
    assert (diagram.lane_heads is not None) == late and (diagram.head is None) == late
    assert diagram.merge.title == make_config(None, overrides).fusion.name
    if stages:
        assert diagram.lanes["fou"][1][0].detail == "76→128"


def test_figure_draws_bottleneck_tokens_and_a_multiscale_neck(tmp_path):
    mbt = describe({"model": {"name": "transformer-streams", "layers": 4, "fuse_at": "last"}, "fusion": {"name": "late"},
                    "exchange": {"name": "bottleneck", "fusion_layer": 2, "n_bottlenecks": 4}},
                   dims={"audio": 128, "video": 768}, num_classes=5)
    assert mbt.exchanges[0].wrapping and mbt.exchanges[0].stages == [2, 3] and mbt.exchanges[0].n_tokens == 4
    svg, pdf = draw(mbt, tmp_path / "mbt")
    text = svg.read_text()
    assert svg.suffix == ".svg" and pdf.read_bytes()[:5] == b"%PDF-"
    assert "bottleneck (4 tokens)" in text and "audio" in text and "video" in text
    cen = sketch({"model": {"name": "conv-streams", "layers": 3, "fuse_at": "all", "neck": "fpn"},
                  "fusion": {"name": "concat"}, "exchange": {"name": "channel-exchange", "stages": "all"}},
                 dims={"rgb": 3, "depth": 1}, num_classes=2)
    assert cen.merge_at == [0, 1, 2] and cen.neck.title == "FPN" and [e.stages for e in cen.exchanges] == [[0], [1]]
    assert "FPN" in draw(cen, tmp_path / "cen", formats=("svg",))[0].read_text()


_cli = run_cli  # (exit code, stdout, stderr) of `fuselab ARGS`


def test_figure_command_writes_svg_and_pdf(tmp_path, capsys):
    code, out, err = _cli(capsys, "figure", "model.fuse_at=0", "data.views=[fou,zer]", "--out", str(tmp_path / "net"))
    assert code in (0, None), err
    assert "fou" in (tmp_path / "net.svg").read_text() and (tmp_path / "net.pdf").is_file()
    code, _, err = _cli(capsys, "figure", "model.fuse_at=7", "--out", str(tmp_path / "bad"))
    assert code == 2 and "fuse_at" in err and len(err.strip().splitlines()) == 1


def test_journal_in_english_and_chinese_with_the_same_numbers(store, report):
    en = build_journal(store, since="1d", lang="en")
    zh = build_journal(store, since="1d", lang="zh")
    baseline = report.summary.attrs["baseline"]
    assert en.startswith("# Weekly journal") and "## Progress" in en
    assert zh.startswith("# 工作周报") and "## 工作进展" in zh and "## 下周计划" in zh
    assert f"- 1: tiny-report: tried 4 variants (9 runs) against the baseline {baseline}" in en
    assert f"- 1: tiny-report：尝试了 4 种变体（9 个运行），基线为 {baseline}" in zh
    assert "lmf-r2 (seed 0): RuntimeError: out of memory" in en and "lmf-r2（种子 0）：RuntimeError: out of memory" in zh
    # a spec that is not shipped is named by a copy of the stored spec, and the store is named
    assert (f"Retry the failed runs of tiny-report: `fuselab compare {store / 'tiny-report' / 'spec.yaml'} "
            f"--store {store}`") in en
    for verdict_en, verdict_zh in (("not significant", "差异不显著"), ("significantly", "显著")):
        assert (verdict_en in en) == (verdict_zh in zh)
    numbers = lambda s: re.findall(r"[+-]?\d+\.\d\d(?: ± \d+\.\d\d %| pp)", s)  # noqa: E731
    assert numbers(en) == numbers(zh) and len(numbers(en)) >= 8
    row = report.summary.set_index("method").loc["name=sum,hidden=16"]
    assert f"{row['accuracy_mean'] * 100:.2f} ± {row['accuracy_std'] * 100:.2f} %" in en


def test_journal_period_and_cli(store, tmp_path, capsys):
    assert "No runs finished in this period." in build_journal(store, since="2000-01-01", lang="en", now=946_800_000)
    assert parse_since("2w", 1_000_000.0) == 1_000_000.0 - 14 * 86400
    with pytest.raises(ConfigError, match="neither a duration"):
        parse_since("last week", 0.0)
    path = tmp_path / "j.md"
    code, out, err = _cli(capsys, "journal", "--lang", "zh", "--store", str(store), "--out", str(path))
    assert code in (0, None), err
    assert path.read_text(encoding="utf-8").startswith("# 工作周报") and "工作进展" in out
    code, _, err = _cli(capsys, "journal", "--lang", "fr", "--store", str(store))
    assert code == 2 and "unknown language 'fr'" in err


def test_ablation_axes_pick_two_varied_keys_and_panel_the_rest():
    assert ablation_axes({"fusion.name": ["a", "b", "c"], "model.hidden": [8, 16]}) == ("fusion.name", "model.hidden", [])
    assert ablation_axes({"fusion.name": ["a", "b"]}) is None
    assert ablation_axes({"a": [1, 2], "b": [1], "c": [1, 2, 3], "d": [0, 1]}) == ("c", "a", ["d"])
