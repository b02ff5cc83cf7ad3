"""A small research loop driven through the ``fuselab`` command with its output going to a file (as under
nohup or a batch scheduler): what the printed lines say, and what the report draws.

One tiny real experiment (two views of mfeat, three fusions, two seeds, three epochs) is trained once by
``fuselab compare`` in a subprocess whose stdout is a file; the tests read that file and run further
commands against the same store.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

SPEC = {
    "name": "tiny-week",
    "description": "Three fusions of two mfeat views, for the command-line tests.",
    "base": {
        "data": {"name": "mfeat", "views": ["fou", "kar"]},
        "model": {"name": "mlp-streams", "hidden": 16},
        "train": {"epochs": 3, "batch_size": 128, "threads": 1},
    },
    "grid": {"fusion.name": ["concat", "sum", "max"]},
    "seeds": [0, 1],
    "baseline": {"fusion.name": "concat"},
}
SRC = Path(__file__).resolve().parents[1] / "src" / "fuselab"


def fuselab(*args: str, out: Path, cwd: Path | None = None, timeout: int = 600) -> tuple[int, str, str]:
    """Run ``fuselab ARGS`` with stdout and stderr written to files (not a terminal); return the exit code
    and both texts."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    env.pop("FORCE_COLOR", None)
    stdout, stderr = out.with_suffix(".out"), out.with_suffix(".err")
    with open(stdout, "w") as o, open(stderr, "w") as e:
        proc = subprocess.run([sys.executable, "-m", "fuselab.cli", *args], stdout=o, stderr=e, env=env,
                              cwd=cwd, timeout=timeout)
    return proc.returncode, stdout.read_text(), stderr.read_text()


@pytest.fixture(scope="module")
def week(tmp_path_factory, data_root):
    """The trained experiment: (folder, spec file, store, compare's stdout)."""
    folder = tmp_path_factory.mktemp("week")
    spec_file = folder / "tiny-week.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    store = folder / "store"
    code, out, err = fuselab("compare", str(spec_file), "--store", str(store), "--jobs", "1", out=folder / "compare")
    assert code == 0, err
    return folder, spec_file, store, out


def _curves(method_offset: float) -> pd.DataFrame:
    rows = []
    for corruption in ("noise", "drop"):
        for modality in ("fou", "kar"):
            for level in (0.0, 0.5, 1.0):
                rows.append({"corruption": corruption, "modality": modality, "mode": "zeros", "level": level,
                             "accuracy": 0.9 - 0.4 * level + method_offset})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# 1. plot style in one public module; experiments never import the report package
# ----------------------------------------------------------------------------------------------


def test_experiments_package_never_imports_the_report_package():
    offenders = []
    for file in sorted((SRC / "experiments").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{file.name}: {n}" for n in names if n.startswith("fuselab.report")]
    assert offenders == []


def test_report_draws_robustness_bars_offset_and_says_what_they_are(week, monkeypatch):
    """``fuselab report`` (output not a terminal) on runs with robustness curves: the methods' error bars at
    one level sit at distinct x positions around the true level, and both captions name the bars."""
    from typer.testing import CliRunner

    import fuselab.report.plots as plots
    import fuselab.report.robustness as robustness
    from fuselab.cli import app
    from fuselab.experiments.store import Store

    folder, _, store, _ = week
    st = Store(store)
    for i, run in enumerate(r for r in st.experiment_runs("tiny-week") if r["status"] == "done"):
        offset = {"concat": 0.0, "sum": 0.02, "max": -0.02}[run["method"]] + 0.01 * run["seed"]
        _curves(offset).to_csv(st.run_dir(run["run_id"]) / "robustness.csv", index=False)
    seen: dict[str, list[list[float]]] = {}

    def capture(module, name):
        real = module.save_figure

        def save(fig, stem, formats=("png",)):
            if Path(stem).name == name:
                seen[name] = [list(c.lines[0].get_xdata()) for c in fig.axes[0].containers]
            return real(fig, stem, formats)

        monkeypatch.setattr(module, "save_figure", save)

    capture(plots, "robustness")
    capture(robustness, "robustness_modalities")
    result = CliRunner().invoke(app, ["report", "tiny-week", "--store", str(store), "--no-flops", "--no-html"])
    assert result.exit_code == 0, result.output
    assert "plots" in result.output.splitlines()[-1]
    for name in ("robustness", "robustness_modalities"):
        xs = seen[name]
        assert len(xs) == 3  # one series per method
        at_half = sorted(x[1] for x in xs)  # the three methods' points at level 0.5
        assert at_half[0] < 0.5 < at_half[2] and at_half[1] == pytest.approx(0.5)
        assert at_half[2] - at_half[0] <= 0.5 / 3 + 1e-9  # within a third of the gap between levels
    report = (store / "tiny-week" / "report" / "report.md").read_text()
    assert report.count("error bars: ± std over seeds (methods offset slightly along the level axis") == 2


def test_style_module_is_public_and_dodge_centres_the_offsets():
    from fuselab.report import style

    assert [style.dodge(i, 3, 0.3) for i in range(3)] == pytest.approx([-0.05, 0.0, 0.05])
    assert style.dodge(0, 1, 0.3) == 0.0 and style.dodge(1, 2, float("nan")) == 0.0
    assert style.style_for(0) != style.style_for(8) and style.style_for(8)["color"] == style.style_for(0)["color"]
    assert style.axis_label("epoch", "zh") == "轮次" and style.TEXT_WIDTH > style.COLUMN_WIDTH
    with style.paper_style():
        import matplotlib

        assert matplotlib.rcParams["font.size"] == 8


# ----------------------------------------------------------------------------------------------
# 2. progress in a log file: one plain line per finished run
# ----------------------------------------------------------------------------------------------

LINE = re.compile(r"^\[(\d+)/6\] (\d+):(\d\d) elapsed, ETA (\?|\d+:\d\d)  (concat|sum|max) seed ([01]): "
                  r"(trained|already in the store), test accuracy (\d+\.\d\d) %  \((\d+) failed\)$")


def test_compare_prints_one_plain_line_per_finished_run_when_not_on_a_terminal(week):
    _, _, store, out = week
    lines = [LINE.match(line) for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 6 and all(lines), out
    assert [int(m.group(1)) for m in lines] == [1, 2, 3, 4, 5, 6]  # the count rises by one per run
    assert {(m.group(5), m.group(6)) for m in lines} == {(f, s) for f in ("concat", "sum", "max") for s in "01"}
    assert all(m.group(7) == "trained" and m.group(9) == "0" for m in lines)
    assert lines[-1].group(4) == "0:00" and lines[0].group(4) != "?"  # an ETA from the first trained run on
    assert "━" not in out and "\x1b[" not in out  # no bar, no colour codes in a log file
    # the printed accuracy is the stored one
    from fuselab.experiments.store import Store

    stored = {(r["method"], str(r["seed"])): r["metrics"]["test_accuracy"] for r in Store(store).experiment_runs("tiny-week")}
    for m in lines:
        assert float(m.group(8)) == pytest.approx(stored[(m.group(5), m.group(6))] * 100, abs=0.006)


def test_compare_again_reports_cached_runs_with_their_metric(week):
    folder, spec_file, store, _ = week
    code, out, err = fuselab("compare", str(spec_file), "--store", str(store), "--jobs", "1", out=folder / "again")
    assert code == 0, err
    lines = [LINE.match(line) for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 6 and all(m and m.group(7) == "already in the store" for m in lines), out
    assert "0 trained, 6 already in the store, 0 failed" in out


def test_robustness_prints_one_plain_line_per_evaluated_run(week):
    folder, _, store, _ = week
    args = ("robustness", "tiny-week", "--store", str(store), "--levels", "0,0.5,1", "--corruptions", "noise")
    code, out, err = fuselab(*args, out=folder / "robust")
    assert code == 0, err
    line = re.compile(r"^\[(\d)/6\] \d+:\d\d elapsed, ETA (\?|\d+:\d\d)  (concat|sum|max) seed [01]: "
                      r"(evaluated|up to date)  \(0 failed\)$")
    found = [line.match(x) for x in out.splitlines() if x.startswith("[")]
    assert len(found) == 6 and all(m and m.group(4) == "evaluated" for m in found), out
    assert "6 runs evaluated, 0 up to date" in out
    code, out, err = fuselab(*args, out=folder / "robust-again")
    found = [line.match(x) for x in out.splitlines() if x.startswith("[")]
    assert code == 0 and len(found) == 6 and all(m and m.group(4) == "up to date" for m in found), out


# ----------------------------------------------------------------------------------------------
# 3. --dry-run: only the methods asked for, unknown names refused, estimates measured
# ----------------------------------------------------------------------------------------------

PER_RUN = re.compile(r"^  (\w+): (\d+\.\d) s per run; (.*)$")


def test_dry_run_plans_only_the_methods_asked_for_and_times_their_models(week):
    folder, spec_file, store, _ = week
    empty = folder / "dry-store"
    code, out, err = fuselab("compare", str(spec_file), "--store", str(empty), "--dry-run", "--jobs", "2",
                             "--methods", "concat,max", out=folder / "dry")
    assert code == 0, err
    assert not empty.exists()  # a dry run creates no store
    assert "4 of 4 runs to train" in out and "│ sum" not in out and "│ max" in out
    per_run = {m.group(1): m for m in map(PER_RUN.match, out.splitlines()) if m}
    assert set(per_run) == {"concat", "max"}
    assert all(m.group(3).startswith("timed 5 training steps here") for m in per_run.values())
    assert "estimated from: concat, max: timed here, per model" in out
    start = float(re.search(r"starting the workers: (\d+\.\d) s, measured by starting one Python process", out).group(1))
    total = float(re.search(r"estimate (\d+\.\d) s", out).group(1))
    # the wall time: the workers' start, then 4 runs over 2 jobs
    assert total == pytest.approx(start + sum(float(m.group(2)) for m in per_run.values()), abs=0.2)
    seconds_per_step = {m: float(re.search(r"\((\d+\.\d) ms per step", x.group(3)).group(1)) for m, x in per_run.items()}
    # 3 epochs of ceil(1200 training samples / 128) = 10 steps: the per-run figure holds at least those steps
    for method, m in per_run.items():
        assert float(m.group(2)) >= 30 * seconds_per_step[method] / 1000 - 0.05


def test_estimate_is_measured_per_model(data_root):
    """A model 128 times wider is timed slower per step: the estimate comes from timing, not a constant."""
    from fuselab.experiments.profile import estimate_sweep
    from fuselab.experiments.spec import parse_spec

    spec = json.loads(json.dumps(SPEC))
    spec["grid"] = {"model.hidden": [16, 2048]}
    spec["baseline"] = {"model.hidden": 16}
    spec["seeds"] = [0]
    plan = parse_spec(spec).plan()
    estimate = estimate_sweep(plan, jobs=1, cores=1, steps=3, startup=False)
    small, large = (estimate.per_method[r.method][0] for r in plan)
    assert large > 2 * small, estimate.per_method
    assert estimate.seconds == pytest.approx(small + large)


def test_dry_run_refuses_an_unknown_method_with_the_closest_name(week):
    folder, spec_file, store, _ = week
    code, out, err = fuselab("compare", str(spec_file), "--store", str(store), "--dry-run", "--methods", "sum,mxa",
                             out=folder / "typo")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["error: --methods: 'mxa' is not a method of tiny-week; did you mean 'max'? "
                                        "methods are concat, sum, max"]


def test_dry_run_estimates_from_finished_runs_in_the_store(week):
    import shutil

    from fuselab.experiments.store import Store

    folder, spec_file, store, _ = week
    copy = folder / "store-copy"
    shutil.copytree(store, copy)
    st = Store(copy)
    runs = {(r["method"], r["seed"]): r for r in st.experiment_runs("tiny-week")}
    st.delete_runs([runs[("sum", 0)]["run_id"]])
    code, out, err = fuselab("compare", str(spec_file), "--store", str(copy), "--dry-run", "--methods", "sum",
                             out=folder / "dry-store-based")
    assert code == 0, err
    assert "1 of 2 runs to train" in out
    (m,) = [m for m in map(PER_RUN.match, out.splitlines()) if m]
    assert m.group(1) == "sum" and m.group(3) == "median of 1 finished runs in the store"
    assert float(m.group(2)) == pytest.approx(runs[("sum", 1)]["metrics"]["seconds"], abs=0.051)
    assert "estimated from: sum: median time of the finished runs of the method in the store" in out


# ----------------------------------------------------------------------------------------------
# 4. the journal's commands run as printed; fuselab run never replaces a run folder silently
# ----------------------------------------------------------------------------------------------


def _printed_command(line: str) -> list[str]:
    """The command between backticks in ``line``, as an argument list for this interpreter."""
    import shlex

    words = shlex.split(re.search(r"`([^`]+)`", line).group(1))
    assert words[0] == "fuselab"
    return words[1:]


@pytest.mark.parametrize("source", ["recorded", "stored copy"])
def test_journal_next_steps_run_as_printed(week, tmp_path, source):
    """A store elsewhere than ./runs with one run pending: the journal says how to finish it and how to write
    it up, and both commands, run as printed from another folder, succeed."""
    import shutil

    from fuselab.experiments.store import Store

    folder, spec_file, store, _ = week
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    if source == "stored copy":  # the spec file moved away: the journal names a copy of the stored spec
        (copy / "tiny-week" / "spec-source.json").unlink()
    run = next(r for r in Store(copy).experiment_runs("tiny-week") if r["method"] == "max" and r["seed"] == 1)
    code, out, err = fuselab("runs", "retry", "--store", str(copy), "--id", run["run_id"], "--status", "done", "-y",
                             out=tmp_path / "retry")
    assert code == 0 and "1 runs reset to pending" in out, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, out, err = fuselab("journal", "--store", str(copy), "--since", "1d", out=tmp_path / "journal", cwd=elsewhere)
    assert code == 0, err
    (finish,) = [line for line in out.splitlines() if "Finish the pending runs of tiny-week" in line]
    args = _printed_command(finish)
    expected = str(spec_file) if source == "recorded" else str(copy / "tiny-week" / "spec.yaml")
    assert args == ["compare", expected, "--store", str(copy)]
    code, out, err = fuselab(*args, out=tmp_path / "finish", cwd=elsewhere)
    assert code == 0, err
    assert "1 trained, 5 already in the store, 0 failed" in out
    assert not (elsewhere / "runs").exists()  # nothing went to the default store
    code, out, err = fuselab("journal", "--store", str(copy), "--since", "1d", out=tmp_path / "journal2", cwd=elsewhere)
    (write_up,) = [line for line in out.splitlines() if "Write up tiny-week" in line]
    args = _printed_command(write_up)
    assert args == ["report", "tiny-week", "--store", str(copy)]
    code, out, err = fuselab(*args, "--no-flops", "--no-html", out=tmp_path / "report", cwd=elsewhere)
    assert code == 0 and (copy / "tiny-week" / "report" / "results.md").is_file(), err


def test_run_refuses_to_replace_its_folder_unless_forced(tmp_path, data_root):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SPEC["base"], "fusion": {"name": "sum"}, "train": {"epochs": 2, "threads": 1}}))
    out = tmp_path / "single"
    code, first, err = fuselab("run", str(config), "--out", str(out), out=tmp_path / "first")
    assert code == 0, err
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    metrics = (run_dir / "metrics.json").read_text()
    code, second, err = fuselab("run", str(config), "--out", str(out), out=tmp_path / "second")
    assert code == 2 and second == ""
    assert err.strip().splitlines() == [f"error: run folder '{run_dir}' exists (same config and seed); pass --force "
                                        "to train again and replace it, or --out to write elsewhere"]
    assert (run_dir / "metrics.json").read_text() == metrics  # untouched
    code, third, err = fuselab("run", str(config), "--out", str(out), "--force", out=tmp_path / "third")
    assert code == 0, err
    assert "test accuracy" in third and (run_dir / "metrics.json").is_file()
    for text in (first, third, err):
        assert "Previous log files" not in text and "Warning" not in text


# ----------------------------------------------------------------------------------------------
# 5. one option style; plain untruncated output; figure from a spec; the store named when unwritable
# ----------------------------------------------------------------------------------------------


def test_profile_takes_methods_like_compare_and_writes_to_the_experiments_store(week, tmp_path):
    folder, spec_file, store, _ = week
    common = ("--store", str(store), "--device", "cpu", "--threads", "1", "--repeat", "3", "--warmup", "1")
    code, out, err = fuselab("profile", str(spec_file), "--methods", "concat,sum", *common, out=tmp_path / "p1",
                             cwd=tmp_path)
    assert code == 0, err
    done = [x for x in out.splitlines() if x.startswith("[")]
    assert [x.split("  ")[1].split(":")[0] for x in done] == ["concat", "sum"] and done[0].startswith("[1/2] ")
    frame = pd.read_csv(store / "tiny-week" / "profile" / "profile.csv")
    assert {"concat", "sum"} <= set(frame["method"])
    assert not (tmp_path / "runs").exists()  # nothing written to the default store
    code, out, err = fuselab("profile", str(spec_file), "--method", "max", *common, out=tmp_path / "p2")
    assert code == 0 and [x for x in out.splitlines() if x.startswith("[1/1] ")][0].split("  ")[1].startswith("max:"), err
    code, out, err = fuselab("profile", str(spec_file), "--methods", "concat,smu", *common, out=tmp_path / "p3")
    assert code == 2 and err.strip().splitlines() == [
        "error: --methods: 'smu' is not a method of tiny-week; did you mean 'sum'? methods are concat, sum, max"]


def test_tune_takes_methods_and_names_the_closest_for_a_typo(tmp_path):
    spec = {**SPEC, "search": {"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    code, out, err = fuselab("tune", str(path), "--store", str(tmp_path / "s"), "--methods", "sum,mac", out=tmp_path / "t")
    assert code == 2 and err.strip().splitlines() == [
        "error: --methods: 'mac' is not a method of tiny-week; did you mean 'max'? methods are concat, sum, max"]


def test_list_prints_whole_ids_one_a_line_when_not_on_a_terminal(week, tmp_path):
    _, _, store, _ = week
    code, out, _ = fuselab("list", "--pattern", "channel-exchange*", out=tmp_path / "list")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "id\tcontract\tforms\tpaper"
    assert {line.split("\t")[0] for line in lines[1:]} == {"channel-exchange", "channel-exchange-p"}
    assert "…" not in out and all(len(line.split("\t")) == 4 for line in lines)
    code, out, _ = fuselab("runs", "list", "--store", str(store), out=tmp_path / "runs")
    from fuselab.experiments.store import Store

    ids = {r["run_id"] for r in Store(store).experiment_runs("tiny-week")}
    rows = [line.split("\t") for line in out.splitlines()[1:]]
    assert code == 0 and {r[0] for r in rows} == ids and "…" not in out
    assert all(r[1] == "done" and re.fullmatch(r"\d+\.\d\d", r[4]) for r in rows)


def test_figure_draws_a_method_of_a_spec(week, tmp_path):
    _, spec_file, _, _ = week
    code, out, err = fuselab("figure", str(spec_file), "--method", "max", "--out", str(tmp_path / "net"),
                             out=tmp_path / "fig")
    assert code == 0, err
    assert out.splitlines()[0] == "tiny-week: max"
    svg = (tmp_path / "net.svg").read_text()
    assert "max" in svg and "fou" in svg and "kar" in svg and (tmp_path / "net.pdf").is_file()
    code, out, err = fuselab("figure", str(spec_file), "--method", "maks", out=tmp_path / "fig2")
    assert code == 2 and "did you mean 'max'?" in err and len(err.strip().splitlines()) == 1
    code, out, err = fuselab("figure", "fusion.name=sum", "--method", "max", out=tmp_path / "fig3")
    assert code == 2 and err.strip().startswith("error: --method 'max' needs a spec")


@pytest.mark.parametrize("command", ["compare", "profile"])
def test_an_unwritable_store_is_named_in_one_line(week, tmp_path, command):
    _, spec_file, _, _ = week
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    extra = ("--repeat", "2", "--warmup", "0") if command == "profile" else ()
    code, out, err = fuselab(command, str(spec_file), "--store", str(blocker / "store"), *extra, out=tmp_path / command)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: store path '{blocker / 'store'}' is not a folder ('{blocker}' is a "
                                        "file); pick another --store"]
    if command == "profile":  # a folder that cannot be created: named as the store, before any timing
        code, out, err = fuselab(command, str(spec_file), "--store", "/proc/fuselab-store", *extra, out=tmp_path / "proc")
        assert code == 2 and out == ""
        assert err.strip().splitlines() == ["error: store '/proc/fuselab-store' cannot be written (No such file or "
                                            "directory: '/proc/fuselab-store'); pick another --store"]


# ----------------------------------------------------------------------------------------------
# 6. plots localised with the report
# ----------------------------------------------------------------------------------------------


def test_chinese_report_plots_follow_the_font_that_is_installed(week, monkeypatch):
    """``fuselab report --lang zh``: with a Chinese font the axis labels are Chinese; without one they stay
    English, the report says so, and nothing is warned about."""
    import warnings

    from typer.testing import CliRunner

    import fuselab.report.plots as plots
    import fuselab.report.style as style
    from fuselab.cli import app

    _, _, store, _ = week
    labels: dict[str, list[str]] = {}
    real = plots.save_figure

    def save(fig, stem, formats=("png",)):
        labels[Path(stem).name] = [ax.get_ylabel() for ax in fig.axes]
        return real(fig, stem, formats)

    monkeypatch.setattr(plots, "save_figure", save)
    args = ["report", "tiny-week", "--store", str(store), "--lang", "zh", "--no-flops"]
    report = store / "tiny-week" / "report" / "report.zh.md"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setattr(style, "cjk_font", lambda: None)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert labels["training_curves"] == ["Training loss", "Validation accuracy (%)"]
    assert "*图中文字为英文：本机未安装含中文字形的字体" in report.read_text(encoding="utf-8")
    assert 'id="plots-english"' in (store / "tiny-week" / "report" / "report.zh.html").read_text(encoding="utf-8")
    assert [str(w.message) for w in caught if "font" in str(w.message).lower() or "glyph" in str(w.message).lower()] == []

    monkeypatch.setattr(style, "cjk_font", lambda: "DejaVu Sans")  # as if a Chinese font were installed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DejaVu has no Chinese glyphs: matplotlib says so, which is beside the point
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert labels["training_curves"] == ["训练损失", "验证准确率 (%)"]
    assert "图中文字为英文" not in report.read_text(encoding="utf-8")


def test_tune_prints_one_plain_line_per_trial_and_keeps_the_method_alias(tmp_path, data_root):
    spec = {**SPEC, "search": {"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    code, out, err = fuselab("tune", str(path), "--store", str(tmp_path / "s"), "--trials", "2", "--methods", "sum",
                             "--method", "max", out=tmp_path / "t")
    assert code == 0, err
    line = re.compile(r"^\[(\d)/4\] \d+:\d\d elapsed, ETA (\?|\d+:\d\d)  (sum|max) trial ([01]): finished, "
                      r"val accuracy (\d+\.\d\d) %, train\.lr=([0-9.e-]+)  \(0 failed\)$")
    found = [line.match(x) for x in out.splitlines() if x.startswith("[")]
    assert len(found) == 4 and all(found), out
    assert [(m.group(3), m.group(4)) for m in found] == [("sum", "0"), ("sum", "1"), ("max", "0"), ("max", "1")]
    assert all(1.0e-3 <= float(m.group(6)) <= 1.0e-2 for m in found)
    assert "tuning 2 methods, 2 trials each" in out and "━" not in out.split("best on validation")[0]
