"""Comparison tables: per-method summary statistics and their Markdown, LaTeX and CSV renderings.

:func:`summarize` turns one row per finished run into one row per method with mean, std and 95 %
confidence interval per metric, and the tests against the baseline (paired t-test over seeds on the
primary metric, exact McNemar test on the pooled test predictions, both Holm-corrected across the
compared methods). :func:`to_markdown`, :func:`to_latex` and :func:`to_csv` render that summary.
Metrics are taken as "higher is better".
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fuselab.experiments.profile import LATENCY_SPREAD_LIMIT  # measured there, reported here
from fuselab.report.fusion_check import fusion_check, fusion_note
from fuselab.report.i18n import text as i18n_text
from fuselab.report.stats import holm, mcnemar, mean_ci, paired_ttest

__all__ = ["LATEX_PACKAGES", "TRANSFER", "add_transfer", "summarize", "table_header", "to_csv", "to_latex", "to_markdown", "unsteady_latencies"]

DEFAULT_METRICS: tuple[str, ...] = ("accuracy", "macro_f1")

_METRIC_LABELS = {
    "accuracy": "Accuracy",
    "acc": "Accuracy",
    "macro_f1": "Macro-F1",
    "micro_f1": "Micro-F1",
    "weighted_f1": "Weighted-F1",
    "f1": "F1",
    "balanced_accuracy": "Balanced acc.",
    "auroc": "AUROC",
    "auc": "AUC",
}

# cost columns shown after Params where the summary has them (FLOPs from the runs, the rest from a profile)
COST_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("flops", "FLOPs", "si"),
    ("latency_b1_ms", "Latency b1 (ms)", "ms"),
    ("latency_b64_ms", "Latency b64 (ms)", "ms"),
    ("peak_mem_mb", "Peak mem. (MB)", "mb"),
)

# spread of a profiled latency: the summary's ``<column>_q1`` / ``<column>_q3`` (interquartile range)
LATENCY_SPREAD = ("latency_b1_ms", "latency_b64_ms")

UP_MARK = "▲"
DOWN_MARK = "▼"
BASELINE_MARK = "(baseline)"
ONE_SEED = "n = 1"  # the std cell of a method with one seed: its std is not zero, it is unknown
ONE_SEED_NOTE = "n = 1: a single seed, so no std or CI is shown (not a zero variance)."
LATENCY_NOTE = "Latency: median over repeated forward passes [interquartile range]."
LATEX_PACKAGES = ("booktabs", "amssymb", "graphicx")  # what to_latex's output needs


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------


def _pooled_correct(rows: pd.DataFrame, seeds: Sequence[int]) -> np.ndarray:
    """Concatenate the ``correct`` arrays of ``rows`` (indexed by seed) in the order of ``seeds``."""
    parts = [np.asarray(rows.at[seed, "correct"], dtype=bool).reshape(-1) for seed in seeds]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def summarize(
    runs: pd.DataFrame,
    *,
    baseline: str,
    metrics: Sequence[str] = DEFAULT_METRICS,
    primary: str = "accuracy",
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Summarize finished runs per method and test each method against the baseline.

    Args:
        runs: one row per finished run with columns ``method``, ``seed``, one column per metric,
            ``params`` and ``correct`` (a bool array per run: whether each test sample was predicted
            right; test sets of the same seed are aligned across methods). ``params`` and
            ``correct`` may be absent, giving nan parameters / McNemar p-values.
        baseline: the method every other method is compared with.
        metrics: metric columns to summarize (higher is better).
        primary: the metric used for ``delta`` and the paired t-test.
        alpha: significance level applied to the Holm-corrected p-values.

    Returns:
        One row per method, the baseline first and the others in order of first appearance, with
        columns ``method``, ``n_seeds``, ``<metric>_mean``, ``<metric>_std``, ``<metric>_ci`` (95 %
        CI half-width) per metric, ``params`` (median), ``delta`` (primary mean minus the baseline's),
        ``p_ttest`` (paired over the seeds shared with the baseline), ``p_mcnemar`` (on the correct
        arrays pooled over those seeds in seed order), ``p_ttest_holm``, ``p_mcnemar_holm`` (Holm
        over the non-baseline methods, per test), ``significant`` (both corrected p < alpha),
        ``better`` and ``worse``. The baseline row has nan p-values and no flags set.
        ``attrs`` holds ``baseline``, ``primary``, ``alpha`` and ``metrics``.

    Raises:
        ValueError: on missing columns, an unknown baseline, duplicate (method, seed) runs or
            misaligned ``correct`` arrays.
    """
    metrics = list(metrics)
    required = ["method", "seed", *metrics]
    if primary not in required:
        required.append(primary)
    missing = [c for c in required if c not in runs.columns]
    if missing:
        raise ValueError(f"runs is missing column(s) {missing}; it has {list(runs.columns)}")
    if runs.empty:
        raise ValueError("runs is empty: there is nothing to summarize")

    methods = list(dict.fromkeys(runs["method"].tolist()))
    if baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not among the methods: {methods}")
    duplicated = runs.duplicated(subset=["method", "seed"], keep=False)
    if duplicated.any():
        pairs = runs.loc[duplicated, ["method", "seed"]].itertuples(index=False)
        dups = sorted({(str(m), int(s)) for m, s in pairs})
        raise ValueError(f"several runs share the same (method, seed): {dups}")
    ordered = [baseline] + [m for m in methods if m != baseline]

    has_params = "params" in runs.columns
    has_correct = "correct" in runs.columns
    by_method = {m: runs[runs["method"] == m].set_index("seed").sort_index() for m in ordered}
    base = by_method[baseline]
    base_primary = float(np.mean(base[primary].to_numpy(dtype=float)))

    records: list[dict[str, Any]] = []
    for method in ordered:
        rows = by_method[method]
        rec: dict[str, Any] = {"method": method, "n_seeds": len(rows)}
        for metric in metrics:
            mean, std, ci = mean_ci(rows[metric].to_numpy(dtype=float))
            rec[f"{metric}_mean"], rec[f"{metric}_std"], rec[f"{metric}_ci"] = mean, std, ci
        params = rows["params"].to_numpy(dtype=float) if has_params else np.array([math.nan])
        rec["params"] = float(np.median(params)) if not np.all(np.isnan(params)) else math.nan
        cost = [c for c, _, _ in COST_COLUMNS] + [f"{c}_{q}" for c in LATENCY_SPREAD for q in ("q1", "q3")]
        for col in cost:
            if col in runs.columns:
                values = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float)
                rec[col] = float(np.nanmedian(values)) if not np.all(np.isnan(values)) else math.nan
        rec["delta"] = float(np.mean(rows[primary].to_numpy(dtype=float))) - base_primary
        rec.update(fusion_check(rows))
        rec["in_sample"] = "test_in_sample" in rows.columns and \
            bool(rows["test_in_sample"].fillna(False).astype(bool).any())

        p_t = p_mc = math.nan
        if method != baseline:
            common = [s for s in rows.index if s in base.index]
            p_t = paired_ttest(
                rows.loc[common, primary].to_numpy(dtype=float),
                base.loc[common, primary].to_numpy(dtype=float),
            )
            if has_correct and common:
                for seed in common:
                    n_m = np.asarray(rows.at[seed, "correct"]).size
                    n_b = np.asarray(base.at[seed, "correct"]).size
                    if n_m != n_b:
                        raise ValueError(
                            f"seed {seed}: {method!r} has {n_m} test predictions but baseline "
                            f"{baseline!r} has {n_b}; test sets of one seed must be aligned"
                        )
                p_mc = mcnemar(_pooled_correct(rows, common), _pooled_correct(base, common))
        rec["p_ttest"], rec["p_mcnemar"] = p_t, p_mc
        records.append(rec)

    summary = pd.DataFrame.from_records(records)
    others = summary["method"] != baseline
    for test in ("p_ttest", "p_mcnemar"):
        corrected = np.full(len(summary), np.nan)
        corrected[others.to_numpy()] = holm(summary.loc[others, test].to_numpy(dtype=float))
        summary[f"{test}_holm"] = corrected
    with np.errstate(invalid="ignore"):
        significant = (summary["p_ttest_holm"] < alpha) & (summary["p_mcnemar_holm"] < alpha)
    summary["significant"] = significant.to_numpy(dtype=bool) & others.to_numpy()
    summary["better"] = summary["significant"] & (summary["delta"] > 0)
    summary["worse"] = summary["significant"] & (summary["delta"] < 0)
    summary.attrs.update(baseline=baseline, primary=primary, alpha=alpha, metrics=tuple(metrics))
    return summary


TRANSFER = "transfer:"  # prefix of a transfer column's statistics in a summary: ``transfer:<name>_mean`` ...


def add_transfer(summary: pd.DataFrame, sets: dict[str, pd.DataFrame], *, metric: str) -> pd.DataFrame:
    """The summary with one transfer column per named extra test set: ``metric`` on that set per run.

    Each frame of ``sets`` has one row per evaluated run (``method``, ``seed``, ``metric`` and optionally
    ``correct``); it is summarised by :func:`summarize` itself, so a transfer column has the main column's
    statistics (mean, std, 95 % CI over its seeds) and tests against the baseline (paired t-test, McNemar,
    both Holm-corrected across the methods, ``better``/``worse`` at the summary's alpha). They are stored as
    ``transfer:<name>_<field>`` (fields ``mean std ci n delta p_ttest_holm p_mcnemar_holm better worse``).
    A method without an evaluation of a set has nan there; without the baseline's, no test is made.
    ``attrs["transfer"]`` lists the set names, ``attrs["transfer_metric"]`` the metric."""
    out = summary.copy()
    baseline = str(summary.attrs.get("baseline", summary["method"].iloc[0]))
    alpha = float(summary.attrs.get("alpha", 0.05))
    names = []
    for name, frame in sets.items():
        frame = frame[frame["method"].isin(set(summary["method"]))]
        if frame.empty:
            continue
        if baseline in set(frame["method"]):
            try:
                part = summarize(frame, baseline=baseline, metrics=[metric], primary=metric, alpha=alpha)
            except ValueError:  # test sets of one seed not aligned across methods: no McNemar test
                part = summarize(frame.drop(columns=["correct"], errors="ignore"), baseline=baseline,
                                 metrics=[metric], primary=metric, alpha=alpha)
        else:  # statistics without tests
            part = summarize(frame.drop(columns=["correct"], errors="ignore"), baseline=str(frame["method"].iloc[0]),
                             metrics=[metric], primary=metric, alpha=alpha)
            for col in ("delta", "p_ttest_holm", "p_mcnemar_holm"):
                part[col] = math.nan
            part["better"] = part["worse"] = False
        part = part.set_index("method")
        fields = {"mean": f"{metric}_mean", "std": f"{metric}_std", "ci": f"{metric}_ci", "n": "n_seeds",
                  "delta": "delta", "p_ttest_holm": "p_ttest_holm", "p_mcnemar_holm": "p_mcnemar_holm",
                  "better": "better", "worse": "worse"}
        for field, col in fields.items():
            values = out["method"].map(part[col])
            out[f"{TRANSFER}{name}_{field}"] = values.fillna(False).astype(bool) if field in ("better", "worse") else values
        names.append(name)
    out.attrs.update(summary.attrs)
    out.attrs.update(transfer=tuple(names), transfer_metric=metric)
    return out


def _transfers(summary: pd.DataFrame) -> list[str]:
    """The transfer columns of a summary, as the prefixes of their statistics (``transfer:<name>``)."""
    return [f"{TRANSFER}{name}" for name in summary.attrs.get("transfer", ())]


def _value_columns(summary: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """The columns that show a mean ± std: the metrics, then the transfer columns."""
    return [*metrics, *_transfers(summary)]


def _column_label(summary: pd.DataFrame, column: str) -> str:
    if column.startswith(TRANSFER):
        return f"{column[len(TRANSFER):]}: {_metric_label(str(summary.attrs.get('transfer_metric', 'accuracy')))}"
    return _metric_label(column)


def _cell_seeds(r: dict[str, Any], column: str) -> float:
    """The number of seeds behind a cell (a transfer column has its own)."""
    n = r.get(f"{column}_n") if column.startswith(TRANSFER) else r["n_seeds"]
    return math.nan if n is None or pd.isna(n) else float(n)


def _transfer_mark(r: dict[str, Any], column: str) -> str:
    """▲/▼ for a transfer cell whose set's tests find the method better/worse than the baseline."""
    if not column.startswith(TRANSFER):
        return ""
    return UP_MARK if r.get(f"{column}_better") else DOWN_MARK if r.get(f"{column}_worse") else ""


def _transfer_note(summary: pd.DataFrame, alpha: str) -> str:
    """The note under a table with transfer columns (empty without)."""
    names = summary.attrs.get("transfer", ())
    if not names:
        return ""
    metric = _metric_label(str(summary.attrs.get("transfer_metric", "accuracy")))
    return (f"Transfer columns ({', '.join(names)}): {metric} of the same runs on the spec's extra test sets "
            f"(`evaluate:`), mean ± std over the seeds evaluated; {UP_MARK}/{DOWN_MARK} in a cell: the same tests "
            f"against the baseline on that set (paired t-test and McNemar's test, both p < {alpha} after Holm).")


# ----------------------------------------------------------------------------------------------
# rendering helpers
# ----------------------------------------------------------------------------------------------


def _infer_metrics(summary: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        metrics = summary.attrs.get("metrics") or [
            c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")
        ]
    metrics = list(metrics)
    missing = [m for m in metrics if f"{m}_mean" not in summary.columns]
    if missing:
        raise ValueError(f"summary has no statistics for metric(s) {missing}")
    return metrics


def _baseline_name(summary: pd.DataFrame) -> str:
    name = summary.attrs.get("baseline")
    return str(name) if name is not None else str(summary["method"].iloc[0])


def _metric_label(metric: str) -> str:
    return _METRIC_LABELS.get(metric, metric.replace("_", " ").capitalize())


def _ranks(values: np.ndarray, decimals: int) -> np.ndarray:
    """Dense rank (1 = best, higher is better) of the values as displayed; nan gets rank 0."""
    shown = np.round(values, decimals)
    distinct = sorted({v for v in shown if not np.isnan(v)}, reverse=True)
    position = {v: i + 1 for i, v in enumerate(distinct)}
    return np.array([0 if np.isnan(v) else position[v] for v in shown], dtype=int)


def _fmt(value: float, decimals: int) -> str:
    return "–" if value is None or np.isnan(value) else f"{value:.{decimals}f}"


def _fmt_params(value: float) -> str:
    return "–" if value is None or np.isnan(value) else f"{int(round(value)):,}"


def _cost_columns(summary: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The cost columns the summary has values for."""
    return [c for c in COST_COLUMNS if c[0] in summary.columns
            and not pd.to_numeric(summary[c[0]], errors="coerce").isna().all()]


def _fmt_cost(value: Any, kind: str) -> str:
    value = float(value) if value is not None else math.nan
    if np.isnan(value):
        return "–"
    if kind == "si":
        for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.3g}{unit}"
        return f"{value:.3g}"
    return f"{value:.3f}" if kind == "ms" else f"{value:.2f}"


def _fmt_cost_cell(r: dict[str, Any], col: str, kind: str, dash: str = "–") -> str:
    """A cost cell; a profiled latency with its interquartile range reads ``median [q1–q3]``."""
    cell = _fmt_cost(r.get(col), kind)
    q1, q3 = r.get(f"{col}_q1"), r.get(f"{col}_q3")
    if col in LATENCY_SPREAD and cell != "–" and q1 is not None and q3 is not None \
            and not (np.isnan(float(q1)) or np.isnan(float(q3))):
        cell += f" [{_fmt_cost(q1, kind)}{dash}{_fmt_cost(q3, kind)}]"
    return cell


def _has_latency_spread(summary: pd.DataFrame, costs: Sequence[tuple[str, str, str]]) -> bool:
    return any(f"{c}_q1" in summary.columns and summary[f"{c}_q1"].notna().any() for c, _, _ in costs
               if c in LATENCY_SPREAD)


def unsteady_latencies(summary: pd.DataFrame, limit: float = LATENCY_SPREAD_LIMIT) -> list[str]:
    """``method b<batch>`` for each profiled latency whose interquartile range exceeds ``limit`` times its
    median: its repetitions disagree, so it is no figure to compare methods by."""
    out = []
    for r in summary.to_dict("records"):
        for col in LATENCY_SPREAD:
            median, q1, q3 = (pd.to_numeric(r.get(c), errors="coerce") for c in (col, f"{col}_q1", f"{col}_q3"))
            if median is not None and q1 is not None and q3 is not None and median > 0 and (q3 - q1) / median > limit:
                out.append(f"{r['method']} {col.split('_')[1]}")
    return out


def _unsteady_note(summary: pd.DataFrame) -> str:
    unsteady = unsteady_latencies(summary)
    if not unsteady:
        return ""
    return (f"Unsteady latency (interquartile range above {LATENCY_SPREAD_LIMIT * 100:.0f} % of the median, the "
            f"machine was probably busy; profile again on an idle machine): {', '.join(unsteady)}.")


def _one_seed(r: dict[str, Any]) -> bool:
    return int(r["n_seeds"]) == 1


def _has_one_seed(summary: pd.DataFrame) -> bool:
    return bool((summary["n_seeds"] == 1).any())


def in_sample_methods(summary: pd.DataFrame) -> list[str]:
    """Methods whose test metrics include their training samples (``test_in_sample`` runs)."""
    if "in_sample" not in summary.columns:
        return []
    return [str(r["method"]) for _, r in summary.iterrows() if r["in_sample"]]


def table_header(summary: pd.DataFrame, *, metrics: Sequence[str] | None = None, percent: bool = True,
                 show_ci: bool = True) -> list[str]:
    """The column headings of the Markdown table (the HTML table shows the same columns)."""
    metrics = _infer_metrics(summary, metrics)
    unit = " (%)" if percent else ""
    primary = summary.attrs.get("primary", metrics[0])
    header = ["Method", "Seeds"]
    for metric in _value_columns(summary, metrics):
        header.append(f"{_column_label(summary, metric)}{unit}")
        if show_ci:
            header.append("±CI")
    header += ["Params", *(label for _, label, _ in _cost_columns(summary)),
               f"Δ {_metric_label(primary)}{' (pp)' if percent else ''}", "vs. baseline"]
    if _has_fusion_check(summary):
        header.append("Fusion check")
    return header


def _fmt_delta(value: float, scale: float, decimals: int) -> str:
    return "–" if np.isnan(value) else f"{value * scale:+.{decimals}f}"


def _n_compared(summary: pd.DataFrame, baseline: str) -> int:
    return int((summary["method"] != baseline).sum())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _alpha_text(summary: pd.DataFrame) -> str:
    return f"{summary.attrs.get('alpha', 0.05):g}"


def _has_fusion_check(summary: pd.DataFrame) -> bool:
    return "fusion_check" in summary.columns and bool(summary["fusion_check"].fillna("").astype(bool).any())


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")


def to_markdown(
    summary: pd.DataFrame,
    *,
    caption: str,
    metrics: Sequence[str] | None = None,
    percent: bool = True,
    show_ci: bool = True,
    missing: Sequence[str] = (),
) -> str:
    """Render a :func:`summarize` result as a GitHub Markdown table.

    Cells read ``mean ± std`` over seeds (in percent with two decimals when ``percent``), with the
    95 % CI half-width in its own ``±CI`` column; the best mean per metric is bold. A method with a
    single seed reads ``mean (n = 1)``: its spread is unknown, not zero. The last column marks
    methods significantly better (``▲``) or worse (``▼``) than the baseline. The ``missing`` lines
    (what the table leaves out: pending or failed runs, methods short of seeds) come first, then the
    caption, the table, and a note explaining the columns and marks last.

    Args:
        summary: the output of :func:`summarize`.
        caption: a line shown above the table.
        metrics: metrics to show; by default those the summary was built with.
        percent: show metrics in percent (two decimals) instead of fractions (four decimals).
        show_ci: add a ``±CI`` column after each metric.
        missing: lines saying what the table leaves out, shown as a quote above the caption.
    """
    metrics = _infer_metrics(summary, metrics)
    baseline = _baseline_name(summary)
    scale, decimals = (100.0, 2) if percent else (1.0, 4)

    header = table_header(summary, metrics=metrics, percent=percent, show_ci=show_ci)
    costs = _cost_columns(summary)
    check = _has_fusion_check(summary)
    columns = _value_columns(summary, metrics)
    align = [":---", "---:", *["---:"] * (len(columns) * (2 if show_ci else 1) + 1 + len(costs) + 1), ":---:",
             *([":---"] if check else [])]

    ranks = {m: _ranks(summary[f"{m}_mean"].to_numpy(dtype=float) * scale, decimals) for m in columns}
    lines = [*(f"> {_md_escape(line)}" for line in missing), *([""] if missing else []),
             caption, "", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for i, row in enumerate(summary.itertuples(index=False)):
        r = dict(zip(summary.columns, row))
        is_base = r["method"] == baseline
        cells = [_md_escape(r["method"]), str(int(r["n_seeds"]))]
        for metric in columns:
            mean = _fmt(r[f"{metric}_mean"] * scale, decimals)
            spread = f"({ONE_SEED})" if _cell_seeds(r, metric) == 1 else f"± {_fmt(r[f'{metric}_std'] * scale, decimals)}"
            text = f"{mean} {spread}" if mean != "–" else mean
            text = f"**{text}**" if ranks[metric][i] == 1 else text
            mark = _transfer_mark(r, metric)
            cells.append(f"{text} {mark}" if mark else text)
            if show_ci:
                ci = r[f"{metric}_ci"]
                cells.append("–" if np.isnan(ci) else f"±{ci * scale:.{decimals}f}")
        cells.append(_fmt_params(r.get("params", math.nan)))
        cells += [_fmt_cost_cell(r, col, kind) for col, _, kind in costs]
        cells.append("–" if is_base else _fmt_delta(r["delta"], scale, decimals))
        if is_base:
            mark = BASELINE_MARK
        elif r["better"]:
            mark = UP_MARK
        elif r["worse"]:
            mark = DOWN_MARK
        else:
            mark = ""
        cells.append(mark)
        if check:
            cells.append(_md_escape(r.get("fusion_check") or "–"))
        lines.append("| " + " | ".join(cells) + " |")

    n = _n_compared(summary, baseline)
    stat = "mean ± std over seeds" + (" in %" if percent else "")
    ci_note = "; ±CI: half-width of the 95 % t confidence interval" if show_ci else ""
    lines += [
        "",
        f"Values: {stat}{ci_note}; best mean per metric in bold. Baseline: {_md_escape(baseline)}.",
        "",
        f"{UP_MARK}/{DOWN_MARK}: better/worse than the baseline, paired t-test over seeds and "
        f"McNemar's test on pooled test predictions both p < {_alpha_text(summary)} after Holm "
        f"correction across {_plural(n, 'method')}.",
    ]
    if _transfers(summary):
        lines += ["", _transfer_note(summary, _alpha_text(summary))]
    if _has_one_seed(summary):
        lines += ["", ONE_SEED_NOTE]
    in_sample = in_sample_methods(summary)
    if in_sample:
        lines += ["", _md_escape(i18n_text("in_sample_note", "en", methods=", ".join(in_sample)))]
    if _has_latency_spread(summary, costs):
        lines += ["", " ".join(filter(None, [LATENCY_NOTE, _unsteady_note(summary)]))]
    note = fusion_note(summary)
    if note:
        lines += ["", _md_escape(note)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# LaTeX
# ----------------------------------------------------------------------------------------------

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",  # one ± style in LaTeX: the body's
    "–": "--",
}


def _latex_with_code(text: str) -> str:
    """Plain text for LaTeX, escaped, a command in backticks as typewriter text (backticks would typeset as
    quotes)."""
    return re.sub(r"`([^`]*)`", r"\\texttt{\1}", latex_escape(text))


def _latex_text(text: str) -> str:
    """Plain text for a LaTeX cell: escaped, with the warning sign and en dash spelled in ASCII."""
    return latex_escape(str(text).replace("⚠ ", ""))


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (``\\ & % $ # _ { } ~ ^``) in plain text; ``±`` becomes ``$\\pm$``
    and the en dash ``--``, so that a table has one ± style and needs no Unicode input encoding."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(
    summary: pd.DataFrame,
    *,
    caption: str,
    label: str = "tab:compare",
    metrics: Sequence[str] | None = None,
    percent: bool = True,
    missing: Sequence[str] = (),
) -> str:
    """Render a :func:`summarize` result as a booktabs LaTeX table.

    Each metric cell reads ``mean $\\pm$ std`` (``mean ($n = 1$)`` for a method with one seed); per
    metric the best mean is ``\\textbf`` and the second best ``\\underline``. Methods significantly
    better / worse than the baseline carry ``$^\\blacktriangle$`` / ``$^\\blacktriangledown$``. The
    tabular is wrapped in ``\\resizebox`` so that it shrinks to ``\\linewidth`` whatever the number
    of columns (a narrow table keeps its natural size). Needs ``booktabs``, ``amssymb`` and
    ``graphicx``. The ``missing`` lines (what the table leaves out) are written as comments at the top
    and as the first sentence of the note under the table, so an incomplete table is never pasted
    unknowingly.

    Args:
        summary: the output of :func:`summarize`.
        caption: table caption; plain text, LaTeX special characters are escaped.
        label: ``\\label`` key.
        metrics: metrics to show; by default those the summary was built with.
        percent: show metrics in percent (two decimals) instead of fractions (four decimals).
        missing: lines saying what the table leaves out (see above).
    """
    metrics = _infer_metrics(summary, metrics)
    baseline = _baseline_name(summary)
    scale, decimals = (100.0, 2) if percent else (1.0, 4)
    unit = r" (\%)" if percent else ""

    columns = _value_columns(summary, metrics)
    ranks = {m: _ranks(summary[f"{m}_mean"].to_numpy(dtype=float) * scale, decimals) for m in columns}
    costs = _cost_columns(summary)
    check = _has_fusion_check(summary)
    colspec = "l" + "c" * len(columns) + "r" * (1 + len(costs)) + ("l" if check else "")
    header = ["Method", *(f"{latex_escape(_column_label(summary, m))}{unit}" for m in columns), "Params",
              *(latex_escape(label) for _, label, _ in costs), *(["Fusion check"] if check else [])]
    lines = [
        "% requires " + ", ".join(rf"\usepackage{{{p}}}" for p in LATEX_PACKAGES[:-1])
        + rf" and \usepackage{{{LATEX_PACKAGES[-1]}}} (\resizebox)",
        *(f"% {line}" for line in missing),
        r"\begin{table}[t]",
        r"  \centering",
        rf"  \caption{{{latex_escape(caption)}}}",
        rf"  \label{{{label}}}",
        # shrink to the text width when wider, keep the natural size otherwise (\width is the box's own)
        r"  \resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
        rf"  \begin{{tabular}}{{{colspec}}}",
        r"    \toprule",
        "    " + " & ".join(header) + r" \\",
        r"    \midrule",
    ]
    for i, row in enumerate(summary.itertuples(index=False)):
        r = dict(zip(summary.columns, row))
        name = latex_escape(r["method"])
        if r["method"] == baseline:
            name += " (baseline)"
        elif r["better"]:
            name += r"$^\blacktriangle$"
        elif r["worse"]:
            name += r"$^\blacktriangledown$"
        cells = [name]
        for metric in columns:
            mean = _fmt(r[f"{metric}_mean"] * scale, decimals)
            std = _fmt(r[f"{metric}_std"] * scale, decimals)
            if mean == "–":
                cells.append("--")
                continue
            if ranks[metric][i] == 1:
                mean = rf"\textbf{{{mean}}}"
            elif ranks[metric][i] == 2:
                mean = rf"\underline{{{mean}}}"
            mark = {UP_MARK: r"$^\blacktriangle$", DOWN_MARK: r"$^\blacktriangledown$"}.get(_transfer_mark(r, metric), "")
            cells.append((rf"{mean} ($n = 1$)" if _cell_seeds(r, metric) == 1 else rf"{mean} $\pm$ {std}") + mark)
        cells.append(_fmt_params(r.get("params", math.nan)))
        cells += [_fmt_cost_cell(r, col, kind, dash="--") for col, _, kind in costs]
        if check:
            cells.append(_latex_text(r.get("fusion_check") or "--"))
        lines.append("    " + " & ".join(cells) + r" \\")

    n = _n_compared(summary, baseline)
    stat = r"Mean $\pm$ std over seeds" + (r" in \%" if percent else "")
    note = (
        rf"{stat}; best in bold, second best underlined. "
        r"$^\blacktriangle$/$^\blacktriangledown$: better/worse than the baseline "
        rf"({latex_escape(baseline)}), paired $t$-test over seeds and McNemar's test on pooled test "
        rf"predictions both $p < {_alpha_text(summary)}$ after Holm correction across "
        rf"{_plural(n, 'method')}."
    )
    if _transfers(summary):
        note += " " + (_latex_with_code(_transfer_note(summary, _alpha_text(summary)))
                       .replace(UP_MARK, r"$^\blacktriangle$").replace(DOWN_MARK, r"$^\blacktriangledown$"))
    if _has_one_seed(summary):
        note += r" $n = 1$: a single seed, so no std is shown (not a zero variance)."
    in_sample = in_sample_methods(summary)
    if in_sample:
        note += " " + _latex_with_code(i18n_text("in_sample_note", "en", methods=", ".join(in_sample)))
    if _has_latency_spread(summary, costs):
        note += " " + latex_escape(" ".join(filter(None, [LATENCY_NOTE, _unsteady_note(summary)])))
    if check:
        note += " " + _latex_text(fusion_note(summary))
    if missing:
        first, *rest = (_latex_with_code(line) for line in missing)
        note = " ".join([rf"\textbf{{{first}}}", *rest, note])
    lines += [
        r"    \bottomrule",
        r"  \end{tabular}}",
        r"  \par\smallskip",
        rf"  \parbox{{\linewidth}}{{\footnotesize {note}}}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------


def to_csv(summary: pd.DataFrame, path: str | PathLike[str]) -> Path:
    """Write ``summary`` to ``path`` as CSV (no index), leaving out columns that hold arrays.

    Parent folders are created. Returns the path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    array_cols = [
        c
        for c in summary.columns
        if summary[c].dtype == object
        and summary[c].map(lambda v: isinstance(v, (np.ndarray, list, tuple))).any()
    ]
    summary.drop(columns=array_cols).to_csv(out, index=False)
    return out
