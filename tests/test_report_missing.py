"""Reports that say what they leave out, a one-seed row that says n = 1, and paper output that a reviewer
accepts: LaTeX that fits the text width with one ± style and a caption from the spec's description, and an
HTML table with the Markdown table's columns. Driven through ``fuselab report`` with output to a file."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pandas as pd
import pytest

from fuselab.cli import main
from fuselab.experiments.runner import execute_plan, prepare
from fuselab.experiments.spec import parse_spec
from fuselab.experiments.store import Store
from fuselab.report.experiment import _caption, missing_lines
from fuselab.report.tables import summarize, table_header, to_latex, to_markdown

# three fusions x two seeds; the test finishes only concat (both seeds) and sum (seed 0)
SPEC = {
    "name": "tiny-missing",
    "description": "Three vector fusions on two mfeat views.",
    "base": {
        "data": {"name": "mfeat", "views": ["fou", "kar"]},
        "model": {"name": "mlp-streams", "hidden": 16},
        "train": {"epochs": 1, "batch_size": 128, "threads": 1},
    },
    "grid": {"fusion.name": ["concat", "sum", "late"]},
    "seeds": [0, 1],
    "baseline": {"fusion.name": "concat"},
}


@pytest.fixture(scope="module")
def partial(tmp_path_factory, data_root):
    """A store where concat has both seeds, sum seed 0 only (seed 1 interrupted), late none (seed 0 failed,
    seed 1 pending); profiled, so the table has latency columns with their spread."""
    root = tmp_path_factory.mktemp("missing") / "store"
    st = Store(root)
    plan = prepare(parse_spec(json.loads(json.dumps(SPEC))), st)
    by = {(r.method, r.seed): r for r in plan}
    outcomes = execute_plan([by["concat", 0], by["concat", 1], by["sum", 0]], st, jobs=1)
    assert [o.status for o in outcomes] == ["done", "done", "done"]
    for (method, seed), status in ((("sum", 1), "interrupted"), (("late", 0), "failed")):
        token = st.claim(by[method, seed].run_id)
        st.fail(by[method, seed].run_id, "RuntimeError: stopped", token, status=status)
    spec_file = root.parent / "tiny-missing.yaml"
    spec_file.write_text(json.dumps(SPEC))
    return root, spec_file


@pytest.fixture(scope="module")
def reported(partial):
    """``fuselab profile`` then ``fuselab report`` into the store, stdout to a buffer (not a terminal)."""
    root, spec_file = partial
    outputs = []
    for args in (["profile", str(spec_file), "--store", str(root), "--device", "cpu", "--threads", "1",
                  "--repeat", "5", "--warmup", "1"],
                 ["report", "tiny-missing", "--store", str(root), "--no-flops"]):
        buffer = io.StringIO()
        with pytest.raises(SystemExit) as info, contextlib.redirect_stdout(buffer):
            main(args)
        assert info.value.code in (0, None), buffer.getvalue()[-2000:]
        outputs.append(buffer.getvalue())
    return root / "tiny-missing" / "report", outputs[1]


def test_report_states_pending_failed_interrupted_runs_and_short_methods_first(reported):
    out, printed = reported
    lines = [line for line in printed.splitlines() if line.strip()]
    assert lines[0] == ("> Incomplete: 3 of 6 runs are not in this table: 1 pending (late seed 1); "
                        "1 failed (late seed 0); 1 interrupted (sum seed 1).")
    assert lines[1] == "> Methods with fewer seeds than the spec: sum 1 of 2, late 0 of 2 (left out of the table)."
    # the command runs as printed: the spec is not shipped, so a copy of the stored spec is named
    root = out.parent.parent
    assert lines[2] == (f"> `fuselab compare {root / 'tiny-missing' / 'spec.yaml'} --store {root}` trains what is "
                        "missing (failed and interrupted runs are retried).")
    assert (root / "tiny-missing" / "spec.yaml").is_file()
    results = (out / "results.md").read_text(encoding="utf-8")
    assert results.splitlines()[0] == lines[0]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.index("Incomplete: 3 of 6 runs") < report.index("| Method |")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.index('<p class="warn incomplete">Incomplete: 3 of 6 runs') < html.index('<table id="results">')
    assert "sum 1 of 2, late 0 of 2 (left out of the table)" in html
    tex = (out / "results.tex").read_text()
    assert "% Incomplete: 3 of 6 runs are not in this table" in tex
    assert r"\textbf{Incomplete: 3 of 6 runs are not in this table" in tex


def test_a_one_seed_row_says_n_1_instead_of_a_zero_std(reported):
    out, printed = reported
    rows = {line.split(" | ")[0].lstrip("| "): line for line in printed.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"concat", "sum"} and "late" not in rows
    assert re.search(r"\| sum \| 1 \| \d+\.\d\d \(n = 1\) \| – \|", rows["sum"])
    assert "± 0.00" not in rows["sum"] and re.search(r"\d+\.\d\d ± \d+\.\d\d", rows["concat"])
    assert "n = 1: a single seed, so no std or CI is shown (not a zero variance)." in printed
    tex = (out / "results.tex").read_text()
    assert re.search(r"^    sum & (\\underline\{)?\d+\.\d\d\}? \(\$n = 1\$\) & ", tex, re.M)
    assert r"$n = 1$: a single seed, so no std is shown (not a zero variance)." in tex
    html = (out / "report.html").read_text(encoding="utf-8")
    assert re.search(r"<td>sum</td><td>1</td><td[^>]*>\d+\.\d\d \(n = 1\)</td><td>–</td>", html)


def test_a_complete_experiment_has_no_missing_lines():
    runs = [{"method": m, "seed": s, "status": "done"} for m in ("a", "b") for s in (0, 1)]
    frame = pd.DataFrame({"method": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1]})
    assert missing_lines("runs", "x", runs, frame) == []
    runs[3]["status"] = "running"
    lines = missing_lines("runs", "x", runs, frame.iloc[:3], lang="zh")
    assert lines[0] == "结果不完整：4 个运行中有 1 个不在此表中：1 个运行中（b 种子 1）。"
    assert lines[1] == "种子数少于实验设置的方法：b 2 个中的 1 个。"


def test_latex_fits_the_text_width_with_one_pm_style_and_the_description_as_caption(reported):
    out, _ = reported
    tex = (out / "results.tex").read_text()
    assert "±" not in tex and "–" not in tex  # one ± style, no Unicode input needed
    assert tex.splitlines()[0].startswith(r"% requires \usepackage{booktabs}, \usepackage{amssymb} and "
                                          r"\usepackage{graphicx}")
    assert r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%" in tex
    assert tex.index(r"\resizebox") < tex.index(r"\begin{tabular}") < tex.index(r"\end{tabular}}")
    caption = re.search(r"\\caption\{(.*)\}", tex).group(1)
    assert caption.startswith("Three vector fusions on two mfeat views: test accuracy and macro-F1 (\\%)")
    assert r"mean $\pm$ std over 2 seeds (0, 1)" in caption and "tiny-missing" not in caption
    header = next(line for line in tex.splitlines() if line.strip().startswith("Method &"))
    for column in ("Latency b1 (ms)", "Latency b64 (ms)", "Peak mem. (MB)", "Fusion check"):
        assert column in header
    assert re.search(r" & \d+\.\d{3} \[\d+\.\d{3}--\d+\.\d{3}\] & ", tex)  # latency median [q1--q3]


def test_the_latex_table_compiles_within_the_text_width(reported, tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed: no TeX installation to compile the table with")
    out, _ = reported
    doc = tmp_path / "paper.tex"
    # no inputenc mapping for ±: the table must not need one; the narrow text block makes any overflow show
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs,amssymb,graphicx}\n"
                   "\\usepackage[textwidth=12cm]{geometry}\n\\begin{document}\n"
                   + (out / "results.tex").read_text() + "\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    log = (tmp_path / "paper.log").read_text(errors="replace")
    assert "Overfull \\hbox" not in log, log[log.find("Overfull"):][:400]
    assert (tmp_path / "paper.pdf").stat().st_size > 1000


class _Headings(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self._in = False

    def handle_starttag(self, tag, attrs):
        self._in = tag == "th"
        if self._in:
            self.headings.append("")

    def handle_endtag(self, tag):
        self._in = self._in and tag != "th"

    def handle_data(self, data):
        if self._in:
            self.headings[-1] += data


def test_the_html_table_shows_the_markdown_columns_and_the_csv_has_their_values(reported):
    out, printed = reported
    parser = _Headings()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    md_header = next(line for line in printed.splitlines() if line.startswith("| Method"))
    columns = [c.strip() for c in md_header.strip("| ").split(" | ")]
    assert parser.headings[: len(columns)] == columns
    for column in ("±CI", "FLOPs", "Latency b1 (ms)", "Latency b64 (ms)", "Peak mem. (MB)", "Fusion check"):
        assert column in columns
    csv = pd.read_csv(out / "results.csv").set_index("method")
    for column in ("accuracy_ci", "macro_f1_ci", "flops", "latency_b1_ms", "latency_b1_ms_q1", "latency_b1_ms_q3",
                   "latency_b64_ms", "peak_mem_mb", "fusion_check"):
        assert column in csv.columns, column
    assert csv.loc["concat", "latency_b1_ms_q1"] <= csv.loc["concat", "latency_b1_ms"] <= csv.loc["concat", "latency_b1_ms_q3"]
    html = (out / "report.html").read_text(encoding="utf-8")
    q1, median, q3 = (csv.loc["concat", c] for c in ("latency_b1_ms_q1", "latency_b1_ms", "latency_b1_ms_q3"))
    assert f"<td>{median:.3f} [{q1:.3f}–{q3:.3f}]</td>" in html


def test_table_renderers_share_one_header_and_the_caption_falls_back_to_the_name():
    runs = pd.DataFrame({"method": ["a", "b"], "seed": [0, 0], "accuracy": [0.9, 0.8], "macro_f1": [0.9, 0.7]})
    summary = summarize(runs, baseline="a")
    md = to_markdown(summary, caption="c")
    assert "| " + " | ".join(table_header(summary)) + " |" in md
    assert "(n = 1)" in md and "± 0.00" not in md
    tex = to_latex(summary, caption="x ± y – z")
    assert r"\caption{x $\pm$ y -- z}" in tex and "±" not in tex
    spec = {"base": {"data": {"name": "mfeat"}, "train": {"epochs": 3}}}
    assert _caption("small", spec, [0]).startswith("small: test accuracy and macro-F1 (%) on mfeat, one seed (0), "
                                                   "so no std; budget: equal epochs (3)")
    described = {**spec, "description": "Fusions  on\ntwo views."}
    assert _caption("small", described, [0, 1], metrics=("accuracy", "kappa", "f1_change")).startswith(
        "Fusions on two views: test accuracy, Cohen's kappa and F1 of the change class (%)")


def test_the_chinese_report_states_what_is_missing_with_the_same_columns(reported, partial):
    from fuselab.report.experiment import build_report

    root, _ = partial
    zh = build_report(root, "tiny-missing", lang="zh", plots=False, figure=False)
    assert zh.missing[0] == ("结果不完整：6 个运行中有 3 个不在此表中：1 个待运行（late 种子 1）；1 个失败（late 种子 0）；"
                             "1 个被中断（sum 种子 1）。")
    assert zh.markdown.startswith("> " + zh.missing[0])
    md_header = next(line for line in zh.markdown.splitlines() if line.startswith("| "))
    assert md_header.startswith("| 方法 | 种子数 | 准确率 (%) | ±CI |") and "| 延迟 b1 (ms) |" in md_header
    parser = _Headings()
    parser.feed(zh.files["html"].read_text(encoding="utf-8"))
    assert parser.headings[:len(md_header.strip("| ").split(" | "))] == md_header.strip("| ").split(" | ")
    assert "n = 1：只有一个随机种子" in zh.markdown and "单个随机种子" not in zh.markdown  # two seeds in the caption
    tex = (root / "tiny-missing" / "report" / "results.tex").read_text()
    assert "% Incomplete: 3 of 6 runs" in tex  # the LaTeX table stays English


def test_unsteady_profiled_latencies_are_named_under_the_table():
    runs = pd.DataFrame({"method": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1], "accuracy": [0.9, 0.92, 0.8, 0.82],
                         "macro_f1": [0.9, 0.9, 0.7, 0.7]})
    summary = summarize(runs, baseline="a")
    # a: steady (IQR 0.2 of the median); b: busy at batch 1 (IQR 1.5 of the median)
    for col, values in {"latency_b1_ms": [1.0, 1.0], "latency_b1_ms_q1": [0.9, 0.5], "latency_b1_ms_q3": [1.1, 2.0],
                        "latency_b64_ms": [4.0, 4.0], "latency_b64_ms_q1": [3.9, 3.9],
                        "latency_b64_ms_q3": [4.1, 4.1]}.items():
        summary[col] = values
    md = to_markdown(summary, caption="c")
    assert "| 1.000 [0.500–2.000] | 4.000 [3.900–4.100] |" in md
    assert ("Latency: median over repeated forward passes [interquartile range]. Unsteady latency (interquartile "
            "range above 25 % of the median, the machine was probably busy; profile again on an idle machine): b b1.") in md
    tex = to_latex(summary, caption="c")
    assert "1.000 [0.500--2.000]" in tex and "idle machine): b b1." in tex
    steady = summary.assign(latency_b1_ms_q1=0.9, latency_b1_ms_q3=1.1)
    assert "Unsteady" not in to_markdown(steady, caption="c")
