"""The comparison report of one experiment, written to ``<store>/<experiment>/report/``.

``results.{md,tex,csv}`` (the table), ``report.md`` (table, plots and figure with headings),
``plots/*.{png,pdf}``, ``network.{svg,pdf}`` (the baseline's model) and ``report.html`` (all of it in one
self-contained file). What the tables leave out (pending, running, failed, interrupted runs and methods with
fewer seeds than planned) is stated above each table (Markdown, HTML) and in the LaTeX table's comments and
note. With ``lang="zh"`` the Markdown and HTML files carry Chinese headings and captions
and are written as ``*.zh.md`` / ``report.zh.html``; LaTeX and CSV stay English.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import warnings
from pathlib import Path

import pandas as pd

from fuselab.experiments.results import comparison_frame
from fuselab.experiments.store import Store
from fuselab.report.figure import draw_config
from fuselab.report.i18n import check_lang, column_heading, has_text, text
from fuselab.report.plots import method_flops, spec_methods, write_plots
from fuselab.report.tables import LATENCY_SPREAD_LIMIT, add_transfer, summarize, to_csv, to_latex, to_markdown
from fuselab.errors import ConfigError


@dataclasses.dataclass
class Report:
    summary: pd.DataFrame
    markdown: str
    files: dict[str, Path]
    failed: int
    missing: list[str] = dataclasses.field(default_factory=list)  # what the tables leave out, one line each


def _caption(experiment: str, spec: dict, seeds: list[int], lang: str = "en",
             metrics: tuple[str, ...] = ("accuracy", "macro_f1")) -> str:
    """The table's caption: the spec's ``description`` (its name when it has none), the metrics, the data,
    the seeds and the budget. With one seed it says there is no std instead of promising one."""
    base = spec.get("base") or {}
    data = (base.get("data") or {}).get("name", "mfeat")
    epochs = (base.get("train") or {}).get("epochs")
    budget = text("budget_epochs", lang, epochs=epochs) if epochs else text("budget_equal", lang)
    budget += _fairness_mode(spec, lang)
    title = " ".join(str(spec.get("description") or "").split()).rstrip(".") or experiment
    names = [text(f"metric_{m}", lang) if has_text(f"metric_{m}") else m.replace("_", " ") for m in metrics]
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + text("and", lang) + names[-1]
    shown = ", ".join(map(str, seeds))
    stat = (text("caption_one_seed", lang, seeds=shown) if len(seeds) == 1
            else text("caption_stat", lang, n=len(seeds), seeds=shown))
    return text("caption", lang, title=title, metrics=joined, data=data, stat=stat, budget=budget)


def missing_lines(store: str | Path, experiment: str, runs: list[dict], frame: pd.DataFrame,
                  lang: str = "en") -> list[str]:
    """What the tables of an experiment leave out, as lines to show above them (empty when complete).

    Args:
        store: the store folder (named in the command that finishes the runs).
        experiment: the experiment's name.
        runs: its runs as ``Store.experiment_runs`` lists them (``method``, ``seed``, ``status``).
        frame: the finished runs the tables are built from (``method``, ``seed``).
        lang: ``en`` or ``zh``.

    Returns:
        Up to three lines: how many runs are not in the table, by status with their method and seed;
        the methods with fewer finished seeds than planned (those with none are left out of the table);
        the command that trains what is missing.
    """
    from fuselab.report.commands import command, spec_argument, store_args

    sep = "；" if lang == "zh" else "; "
    absent = [r for r in runs if r["status"] != "done"]
    lines = []
    if absent:
        details = []
        for status in ("pending", "running", "failed", "interrupted", "missing"):
            these = sorted((str(r["method"]), int(r["seed"])) for r in absent if r["status"] == status)
            if these:
                listed = ", ".join(text("missing_run", lang, method=m, seed=s) for m, s in these)
                details.append(text("missing_runs", lang, status=text(f"missing_{status}", lang, n=len(these)),
                                    runs=listed))
        lines.append(text("missing_head", lang, k=len(absent), n=len(runs), details=sep.join(details)))
    planned: dict[str, set[int]] = {}
    for r in runs:
        planned.setdefault(str(r["method"]), set()).add(int(r["seed"]))
    items = []
    for method, seeds in planned.items():
        done = int(frame.loc[frame["method"] == method, "seed"].nunique()) if len(frame) else 0
        if done < len(seeds):
            item = text("missing_seed_item", lang, method=method, done=done, planned=len(seeds))
            items.append(item + (text("missing_left_out", lang) if done == 0 else ""))
    if items:
        lines.append(text("missing_seeds", lang, items=(sep if lang == "zh" else ", ").join(items)))
    if lines:
        spec = spec_argument(store, experiment)
        lines.append(text("missing_fix", lang, command=command("compare", spec, *store_args(store))))
    return lines


_MODES = {
    "equal-trials": {"en": ", each method tuned with {trials} Optuna trials on validation",
                     "zh": "，每种方法在验证集上以 {trials} 次 Optuna 试验调参"},
    "match_params": {"en": "; parameters matched to the baseline's within 5 %",
                     "zh": "；参数量与基线相差不超过 5 %"},
}


def _fairness_mode(spec: dict, lang: str) -> str:
    """The fair-comparison mode of a spec as it reads after the budget in the caption."""
    lang = lang if lang in ("en", "zh") else "en"
    out = ""
    if spec.get("budget") == "equal-trials":
        out += _MODES["equal-trials"][lang].format(trials=spec.get("trials", 20))
    if spec.get("match_params"):
        out += _MODES["match_params"][lang]
    return out


def _localize_markdown(markdown: str, lang: str, baseline: str, n: int, alpha: str) -> str:
    """Chinese column headings and notes for a ``to_markdown`` table (unchanged in English)."""
    if lang == "en":
        return markdown
    lines = markdown.split("\n")
    out = []
    header_done = False
    for line in lines:
        if not header_done and line.startswith("| "):
            header_done = True
            line = "| " + " | ".join(column_heading(c, lang) for c in line[2:-2].split(" | ")) + " |"
        elif line.startswith("| ") and " | (baseline) |" in line:  # the mark's column, wherever it is
            line = line.replace(" | (baseline) |", f" | {text('baseline_mark', lang)} |", 1)
        elif line.startswith("Values:"):
            line = text("md_values", lang, baseline=baseline)
        elif line.startswith("n = 1:"):
            line = text("one_seed_note", lang)
        elif line.startswith("Latency: median"):
            parts = [text("latency_note", lang)]
            if "Unsteady latency" in line:  # the methods listed after the last colon
                parts.append(text("unsteady_note", lang, limit=f"{LATENCY_SPREAD_LIMIT * 100:.0f}",
                                  methods=line.rsplit("): ", 1)[1].rstrip(".")))
            line = " ".join(parts)
        elif line.startswith("▲/▼:"):
            line = text("md_marks", lang, alpha=alpha, n=n)
        out.append(line)
    return "\n".join(out)


def _task_columns(frame: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The table's metrics from the columns present: accuracy, kappa, f1_change for change detection,
    accuracy, miou for segmentation, accuracy, macro_f1 otherwise (test metrics, ``test_`` prefix dropped)."""
    for metrics in (("accuracy", "kappa", "f1_change"), ("accuracy", "miou")):
        extra = [m for m in metrics[1:] if f"test_{m}" in frame.columns]
        if len(extra) == len(metrics) - 1 and frame[[f"test_{m}" for m in extra]].notna().all().all():
            return frame.rename(columns={f"test_{m}": m for m in extra}), metrics
    return frame, ("accuracy", "macro_f1")


def _with_profile(summary: pd.DataFrame, store: str | Path, experiment: str) -> pd.DataFrame:
    """The summary with the latency and memory columns of ``fuselab profile`` (and its FLOPs where the runs
    have none), when the experiment has been profiled."""
    from fuselab.experiments.profile import load_profile

    profile = load_profile(store, experiment)
    if profile is None or "method" not in profile:
        return summary
    attrs = dict(summary.attrs)
    by_method = profile.drop_duplicates("method").set_index("method")
    out = summary.copy()
    for col in ("flops", "latency_b1_ms", "latency_b64_ms", "peak_mem_mb", "latency_b1_ms_q1", "latency_b1_ms_q3",
                "latency_b64_ms_q1", "latency_b64_ms_q3"):
        if col not in by_method:
            continue
        values = out["method"].map(by_method[col])
        out[col] = out[col].fillna(values) if col in out else values
    out.attrs.update(attrs)
    return out


def transfer_sets(frame: pd.DataFrame, metric: str) -> tuple[dict[str, pd.DataFrame], dict[str, list[tuple[str, int]]]]:
    """The evaluations of an experiment's finished runs (``<run>/evaluations/<name>.json``, from ``fuselab
    evaluate`` or the spec's ``evaluate:``) as one frame per set name (``method``, ``seed``, ``metric`` and
    ``correct`` where recorded), and per name the runs (method, seed) that lack it."""
    from fuselab.experiments.evaluate import read_correct, read_evaluations

    rows: dict[str, list[dict]] = {}
    for run in frame[["method", "seed", "path"]].to_dict("records"):
        for name, record in read_evaluations(run["path"]).items():
            value = (record.get("metrics") or {}).get(metric)
            if value is None:
                continue
            row = {"method": run["method"], "seed": int(run["seed"]), metric: float(value)}
            correct = read_correct(run["path"], name)
            if correct is not None:
                row["correct"] = correct
            rows.setdefault(name, []).append(row)
    sets = {}
    for name in sorted(rows):
        part = pd.DataFrame(rows[name])
        if "correct" in part and part["correct"].isna().any():  # some runs without it: no McNemar test
            part = part.drop(columns=["correct"])
        sets[name] = part
    lacking = {}
    for name, part in sets.items():
        have = set(zip(part["method"], part["seed"]))
        absent = sorted((str(m), int(s)) for m, s in zip(frame["method"], frame["seed"]) if (m, int(s)) not in have)
        if absent:
            lacking[name] = absent
    return sets, lacking


def transfer_missing_lines(store: str | Path, experiment: str, lacking: dict[str, list[tuple[str, int]]]) -> list[str]:
    """What the transfer columns leave out, one line per set, with the command that scores it."""
    from fuselab.report.commands import command, spec_argument, store_args

    lines = [f"Transfer column '{name}' leaves out {len(runs)} finished run{'s' if len(runs) > 1 else ''} not evaluated "
             f"on it: {', '.join(f'{m} (seed {s})' for m, s in runs)}." for name, runs in lacking.items()]
    if lines:
        spec = spec_argument(store, experiment)
        lines.append(f"Score them with `{command('compare', spec, *store_args(store))}` (a spec with this `evaluate:` "
                     f"set) or `fuselab evaluate {experiment} ... --name NAME`.")
    return lines


def _environments(frame: pd.DataFrame) -> list[dict]:
    """The distinct environments the runs recorded (versions, git revision, hardware), with run counts."""
    seen: dict[str, dict] = {}
    for path in frame["path"]:
        file = Path(path) / "environment.json"
        if not file.is_file():
            continue
        env = json.loads(file.read_text())
        env.pop("torch_threads", None)
        key = json.dumps(env, sort_keys=True)
        seen.setdefault(key, {**env, "_runs": 0})["_runs"] += 1
    return sorted(seen.values(), key=lambda e: -e["_runs"])


def build_report(store: str | Path, experiment: str, *, lang: str = "en", plots: bool = True,
                 figure: bool = True, html: bool = True, flops: bool | str = "cached", pdf: bool = True) -> Report:
    """Summarise an experiment from the store and write its tables, plots, figure and HTML report.

    Args:
        store: the store folder.
        experiment: the experiment's name.
        lang: ``en`` or ``zh`` for headings and captions.
        plots: write the plots (``plots/``).
        figure: draw the baseline's network (``network.svg``/``.pdf``).
        html: write the self-contained ``report.html`` (needs nothing else to be written first).
        flops: True counts FLOPs per sample where a run has none cached (about a second per method),
            ``"cached"`` plots only counts already cached, False leaves FLOPs out.
        pdf: also write the plots and the figure as PDF (for LaTeX; about a second each, for the
            embedded fonts). PNG plots and the SVG figure are always written.
    """
    check_lang(lang)
    st = Store(store)
    info = st.experiment(experiment)
    frame = comparison_frame(store, experiment)
    runs = st.experiment_runs(experiment)
    failed_runs = [
        {"method": r["method"], "seed": r["seed"], "error": (r["error"] or "").splitlines()[0] if r["error"] else "?"}
        for r in runs if r["status"] == "failed"
    ]
    if frame.empty:
        raise ConfigError(f"experiment '{experiment}' has no finished runs yet; run `fuselab compare {experiment}`")
    if info["baseline"] not in set(frame["method"]):
        raise ConfigError(f"the baseline '{info['baseline']}' of '{experiment}' has no finished run yet")
    frame, metrics = _task_columns(frame)
    summary = summarize(frame, baseline=info["baseline"], metrics=metrics, primary=info["metric"])
    summary = _with_profile(summary, store, experiment)
    sets, lacking = transfer_sets(frame, info["metric"])
    if sets:
        summary = add_transfer(summary, sets, metric=info["metric"])
    seeds = sorted(frame["seed"].unique().tolist())
    caption = _caption(experiment, info["spec"], seeds, metrics=metrics)
    local_caption = _caption(experiment, info["spec"], seeds, lang, metrics=metrics)
    missing = missing_lines(store, experiment, runs, frame, lang) + transfer_missing_lines(store, experiment, lacking)
    n_compared = int((summary["method"] != info["baseline"]).sum())
    alpha = f"{summary.attrs.get('alpha', 0.05):g}"
    markdown = _localize_markdown(to_markdown(summary, caption=local_caption, missing=missing),
                                  lang, info["baseline"], n_compared, alpha)
    latex = to_latex(summary, caption=caption, label=f"tab:{experiment}",
                     missing=missing if lang == "en" else missing_lines(store, experiment, runs, frame)
                     + transfer_missing_lines(store, experiment, lacking))
    out = st.report_dir(experiment)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if lang == "en" else f".{lang}"
    files = {"markdown": out / f"results{suffix}.md", "latex": out / "results.tex", "csv": out / "results.csv"}
    files["markdown"].write_text(markdown + "\n", encoding="utf-8")
    files["latex"].write_text(latex + "\n")
    to_csv(summary, files["csv"])

    written_plots = write_plots(frame, summary, info["spec"], out / "plots", lang=lang, flops=flops,
                                formats=("png", "pdf") if pdf else ("png",)) if plots else {}
    for name, plot in written_plots.items():
        files[f"plot:{name}"] = next(p for p in plot["files"] if p.suffix == ".png")
    network = None
    base_runs = frame[frame["method"] == info["baseline"]].sort_values("seed")
    base_config = next((r["config"] for r in runs if r["run_id"] == base_runs["run_id"].iloc[0]), {})
    figure_caption = text("cap_figure", lang, method=info["baseline"])
    if figure:
        try:
            network = draw_config(base_config, out / "network", formats=("svg", "pdf") if pdf else ("svg",))[0]
            files["figure"] = network
        except Exception as exc:  # noqa: BLE001 - a model the figure cannot describe must not cost the tables
            warnings.warn(f"network figure skipped: {type(exc).__name__}: {exc}", stacklevel=2)

    sections = [f"# {text('report_title', lang, experiment=experiment)}", "", f"## {text('results', lang)}", "", markdown]
    if failed_runs:
        sections += [f"## {text('failed_runs', lang)}", ""]
        sections += [f"- {f['method']} (seed {f['seed']}): {f['error']}" for f in failed_runs] + [""]
    if written_plots:
        sections += [f"## {text('plots', lang)}", ""]
        from fuselab.report.style import plot_lang

        if plot_lang(lang) != lang:  # no font for the report's language: the images keep English text
            sections += [f"*{text('plots_english', lang)}*", ""]
        for name, plot in written_plots.items():
            sections += [f"![{name}](plots/{name}.png)", "", f"*{plot['caption']}*", ""]
    from fuselab.report.robustness import report_section

    robust_lines, robust_files, robust_html = report_section(frame, info["baseline"], out, order=list(summary["method"]),
                                                heading=text("robustness", lang), plots=plots, lang=lang,
                                                formats=("png", "pdf") if pdf else ("png",))
    sections += robust_lines
    files.update(robust_files)
    if network is not None:
        sections += [f"## {text('network', lang)}", "", "![network](network.svg)", "", f"*{figure_caption}*", ""]
    files["report"] = out / f"report{suffix}.md"
    files["report"].write_text("\n".join(sections), encoding="utf-8")

    if html:
        from fuselab.report.html import render_html, summary_table_html

        import yaml

        flops_by_method = method_flops(frame, compute=False) if plots and flops else {}
        overrides, _ = spec_methods(info["spec"])
        when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        page = render_html(
            title=text("report_title", lang, experiment=experiment), lang=lang,
            table_html=summary_table_html(summary, caption=local_caption, lang=lang,
                                          flops=flops_by_method or None, missing=missing),
            plots=written_plots, figure=network, figure_caption=figure_caption,
            robustness=(robust_html, robust_files.get("plot:robustness_modalities")) if robust_html else None,
            base_config=base_config, seed=int(base_runs["seed"].iloc[0]),
            overrides={m: overrides.get(m, {}) for m in summary["method"]},
            spec_yaml=yaml.safe_dump(info["spec"], sort_keys=False, allow_unicode=True),
            environments=_environments(frame), failed=failed_runs,
            generated=text("generated", lang, when=when, version=_version()),
        )
        files["html"] = out / f"report{suffix}.html"
        files["html"].write_text(page, encoding="utf-8")
    return Report(summary=summary, markdown=markdown, files=files, failed=len(failed_runs), missing=missing)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fuselab")
    except metadata.PackageNotFoundError:
        return "(source tree)"
