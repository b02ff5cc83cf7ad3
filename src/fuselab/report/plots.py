"""Paper plots of an experiment, in one style that stays readable in a two-column paper.

Every plot is written as PNG (for Markdown and HTML) and PDF (for LaTeX):

* accuracy against parameters and against FLOPs per sample, error bars = std over seeds;
* training curves (training loss, validation accuracy per epoch, mean over seeds with a +- std band);
* robustness curves when runs hold a ``robustness.csv`` (columns ``corruption``, ``level``, ``accuracy``);
* heat maps for two-parameter ablations (two grid keys with several values each; further grid keys give
  one panel per combination).

FLOPs come from ``fuselab.train.flops`` (re-exported here): a run records its count when it finishes, and
:func:`cached_flops` counts a run that lacks one and keeps it in ``runs/<id>/flops.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fuselab.train.flops import cached_flops, flops_per_sample, write_flops  # noqa: E402,F401  (re-exported)
from fuselab.train.session import rebuildable  # noqa: E402,F401  (re-exported)
from fuselab.report.i18n import text  # noqa: E402
from fuselab.report.style import (  # noqa: E402
    BAND_ALPHA,
    COLUMN_WIDTH,
    PALETTE,
    PAPER_RC,
    TEXT_WIDTH,
    axis_label,
    cjk_font,
    dodge,
    paper_style,
    plot_lang,
    save_figure,
    style_for,
)

__all__ = [
    "COLUMN_WIDTH",
    "PAPER_RC",
    "TEXT_WIDTH",
    "cached_flops",
    "flops_per_sample",
    "paper_style",
    "plot_ablation_heatmaps",
    "plot_accuracy_vs_cost",
    "plot_robustness",
    "curves_layout",
    "losses_comparable",
    "plot_training_curves",
    "save_figure",
    "write_plots",
]

# the shared look lives in report.style; the old private names stay for code written against them
_axis = axis_label
_style_for = style_for
_cjk_font = cjk_font


def method_flops(frame: pd.DataFrame, *, compute: bool = True) -> dict[str, float]:
    """Median FLOPs per sample per method over its finished runs (methods without a count are left out)."""
    out: dict[str, float] = {}
    for method, rows in frame.groupby("method", sort=False):
        values = []
        for path in rows["path"]:
            # every seed of a method has the same model; count once, cache in each run folder
            value = cached_flops(path, compute=compute and not values)
            if value is None and values:
                value = values[0]
                write_flops(path, value)
            if value is not None:
                values.append(value)
        if values:
            out[str(method)] = float(np.median(values))
    return out


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------


def _human(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _label_points(ax: plt.Axes, points: list[tuple[float, float, str]], gap: float = 7.0) -> None:
    """Label points to their right; labels of points in one column are spread apart vertically (``gap`` pt)."""
    fig = ax.figure
    ax.get_xlim(), ax.get_ylim()  # settles the autoscaled limits the transform below depends on
    to_px = ax.transData.transform
    pt = fig.dpi / 72.0
    placed = sorted(((*to_px((x, y)), x, y, label) for x, y, label in points), key=lambda p: (p[0], p[1]))
    columns: list[list[tuple]] = []
    for p in placed:  # points within 30 pt horizontally share a column of labels
        if columns and abs(p[0] - columns[-1][0][0]) < 30 * pt:
            columns[-1].append(p)
        else:
            columns.append([p])
    for column in columns:
        column.sort(key=lambda p: p[1])
        ys = [p[1] for p in column]
        for i in range(1, len(ys)):  # push up until labels are gap apart, then centre on the points
            ys[i] = max(ys[i], ys[i - 1] + gap * pt)
        shift = (np.mean([p[1] for p in column]) - np.mean(ys))
        for (px, py, x, y, label), ly in zip(column, ys):
            dy = (ly + shift - py) / pt
            ax.annotate(label, (x, y), xytext=(5, dy), textcoords="offset points", fontsize=6, va="center",
                        arrowprops={"arrowstyle": "-", "linewidth": 0.3, "color": "0.5"} if abs(dy) > 3 else None)


def plot_accuracy_vs_cost(summary: pd.DataFrame, cost: Mapping[str, float], stem: str | Path, *,
                          kind: str = "params", metric: str = "accuracy", lang: str = "en",
                          formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Mean test accuracy (error bar: std over seeds) of each method against its cost, one labelled point each."""
    baseline = summary.attrs.get("baseline", summary["method"].iloc[0])
    rows = [r for r in summary.itertuples(index=False) if not math.isnan(cost.get(r.method, math.nan))]
    with paper_style(lang):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.5))
        xs = np.array([cost[r.method] for r in rows])
        for i, r in enumerate(rows):
            mean, std = getattr(r, f"{metric}_mean") * 100, getattr(r, f"{metric}_std") * 100
            style = _style_for(i)
            is_base = r.method == baseline
            ax.errorbar(cost[r.method], mean, yerr=0 if math.isnan(std) else std, fmt="*" if is_base else style["marker"],
                        color="black" if is_base else style["color"], markersize=7 if is_base else 4,
                        elinewidth=0.8, zorder=4 if is_base else 3)
        if len(xs) and xs.min() > 0 and xs.max() / xs.min() > 20:
            ax.set_xscale("log")
        _label_points(ax, [(cost[r.method], getattr(r, f"{metric}_mean") * 100, str(r.method)) for r in rows])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _human(v)))
        ax.set_xlabel(_axis(kind, lang))
        ax.set_ylabel(_axis("accuracy", lang))
        fig.tight_layout()
        return save_figure(fig, stem, formats)


def _histories(frame: pd.DataFrame) -> dict[str, list[pd.DataFrame]]:
    out: dict[str, list[pd.DataFrame]] = {}
    for method, path in zip(frame["method"], frame["path"]):
        file = Path(path) / "history.csv"
        if file.is_file():
            out.setdefault(str(method), []).append(pd.read_csv(file))
    return out


SMALL_MULTIPLES_FROM = 5  # methods from which training curves get one panel each: five bands in one axes merge


def _loss_config(path: str | Path) -> str | None:
    """The loss section of a run's stored config, as text to compare (None when unreadable)."""
    import yaml

    try:
        config = yaml.safe_load((Path(path) / "config.yaml").read_text())
        return json.dumps((config or {}).get("loss"), sort_keys=True, default=str)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def losses_comparable(frame: pd.DataFrame) -> bool:
    """Do all runs train with the same loss terms and weights? Only then are their training losses on one scale
    (a total with an auxiliary term is larger than the same model's cross-entropy alone)."""
    configs = {_loss_config(p) for p in frame["path"]}
    return len(configs) == 1 and None not in configs


def curves_layout(frame: pd.DataFrame, order: Sequence[str] | None = None) -> dict[str, Any]:
    """How :func:`plot_training_curves` draws ``frame``'s histories: the methods with one, whether each gets
    its own panel (``small_multiples``), and whether the training loss is shown (``loss``)."""
    histories = _histories(frame)
    methods = [m for m in (order or histories) if m in histories]
    has_loss = any("train_loss" in h for hs in histories.values() for h in hs)
    return {"methods": methods, "small_multiples": len(methods) >= SMALL_MULTIPLES_FROM,
            "loss": has_loss and losses_comparable(frame[frame["method"].isin(methods)])}


def _curve_stats(runs: list[pd.DataFrame], column: str, scale: float) -> pd.DataFrame:
    frame = pd.concat(runs)
    return frame.groupby("epoch")[column].agg(["mean", "std"]).fillna(0.0) * scale


def plot_training_curves(frame: pd.DataFrame, stem: str | Path, *, order: Sequence[str] | None = None,
                         lang: str = "en", formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Training curves per method: mean over seeds with a light +- std band, methods in legend order.

    Up to four methods share two panels (training loss, validation accuracy); from
    :data:`SMALL_MULTIPLES_FROM` methods on, validation accuracy gets one small panel per method on shared
    axes, the baseline (the first method of ``order``) drawn grey and dashed in every panel for reference,
    as in Tufte's small multiples. The training loss is left out when the runs' loss configurations differ:
    totals of different loss terms are not on one scale (:func:`losses_comparable`).
    """
    histories = _histories(frame)
    layout = curves_layout(frame, order)
    methods = layout["methods"]
    with paper_style(lang):
        if layout["small_multiples"]:
            return _small_multiples(histories, methods, stem, lang=lang, formats=formats)
        panels = [("train_loss", 1.0)] if layout["loss"] else []
        panels.append(("val_accuracy", 100.0))
        width = TEXT_WIDTH if len(panels) == 2 else COLUMN_WIDTH
        fig, axes = plt.subplots(1, len(panels), figsize=(width, 2.4), squeeze=False)
        axes = axes[0]
        for i, method in enumerate(methods):
            style = style_for(i)
            for ax, (column, scale) in zip(axes, panels):
                if not all(column in h for h in histories[method]):
                    continue
                stats = _curve_stats(histories[method], column, scale)
                x = stats.index.to_numpy() + 1
                ax.plot(x, stats["mean"], color=style["color"], linestyle="-" if i < len(PALETTE) else "--",
                        label=method if ax is axes[0] else None)
                ax.fill_between(x, stats["mean"] - stats["std"], stats["mean"] + stats["std"], color=style["color"],
                                alpha=BAND_ALPHA, linewidth=0)
        for ax, (column, _) in zip(axes, panels):
            ax.set_ylabel(axis_label(column, lang))
            ax.set_xlabel(axis_label("epoch", lang))
        limits = _accuracy_limits(histories, methods)
        if limits:  # the early epochs of a slow starter must not squash the curves where they differ
            axes[-1].set_ylim(*limits)
        if methods:
            fig.legend(loc="lower center", ncol=min(len(methods), 7), bbox_to_anchor=(0.5, -0.02))
            fig.tight_layout(rect=(0, 0.06 * math.ceil(len(methods) / 7) + 0.02, 1, 1))
        return save_figure(fig, stem, formats)


def _accuracy_limits(histories: Mapping[str, list[pd.DataFrame]], methods: Sequence[str]) -> tuple[float, float] | None:
    values = [pd.concat(histories[m])["val_accuracy"] * 100 for m in methods
              if all("val_accuracy" in h for h in histories[m])]
    if not values:
        return None
    low = min(np.nanpercentile(v, 10) for v in values)
    high = max(np.nanmax(v) for v in values)
    return max(0.0, low - 2), min(100.0, high + 0.5)


def _small_multiples(histories: Mapping[str, list[pd.DataFrame]], methods: Sequence[str], stem: str | Path, *,
                     lang: str, formats: Sequence[str]) -> list[Path]:
    """Validation accuracy, one panel per method (its colour, +- std band), the baseline grey in each."""
    columns = min(4, len(methods))
    rows = math.ceil(len(methods) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(TEXT_WIDTH, 1.35 * rows + 0.5), sharex=True, sharey=True,
                             squeeze=False)
    baseline = methods[0]
    base = _curve_stats(histories[baseline], "val_accuracy", 100.0)
    for i, method in enumerate(methods):
        ax = axes[i // columns][i % columns]
        stats = _curve_stats(histories[method], "val_accuracy", 100.0)
        x = stats.index.to_numpy() + 1
        if method != baseline:
            ax.plot(base.index.to_numpy() + 1, base["mean"], color="0.55", linestyle="--", linewidth=0.9)
        color = style_for(i)["color"]
        ax.plot(x, stats["mean"], color=color)
        ax.fill_between(x, stats["mean"] - stats["std"], stats["mean"] + stats["std"], color=color, alpha=BAND_ALPHA * 2,
                        linewidth=0)
        ax.set_title(method, color=color)
        if i % columns == 0:
            ax.set_ylabel(axis_label("val_accuracy", lang))
        if i // columns == rows - 1 or i + columns >= len(methods):
            ax.set_xlabel(axis_label("epoch", lang))
            ax.xaxis.set_tick_params(labelbottom=True)
    for j in range(len(methods), rows * columns):  # empty cells of the last row
        axes[j // columns][j % columns].set_visible(False)
    limits = _accuracy_limits(histories, methods)
    if limits:
        axes[0][0].set_ylim(*limits)
    fig.tight_layout()
    return save_figure(fig, stem, formats)


def robustness_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows (method, seed, corruption, level, accuracy) from the runs' ``robustness.csv`` files, if any; where
    a file has a ``modality`` column (``fuselab robustness``), the accuracy is averaged over the modalities."""
    parts = []
    for method, seed, path in zip(frame["method"], frame["seed"], frame["path"]):
        file = Path(path) / "robustness.csv"
        if file.is_file():
            table = pd.read_csv(file)
            if {"corruption", "accuracy"} <= set(table.columns):
                level = "level" if "level" in table else "severity" if "severity" in table else None
                if level is None:
                    continue
                table = table.rename(columns={level: "level"})
                if "modality" in table:  # one modality corrupted at a time: the mean over modalities
                    table = table.groupby(["corruption", "level"], as_index=False, sort=False)["accuracy"].mean()
                parts.append(table.assign(method=method, seed=seed))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def plot_robustness(robust: pd.DataFrame, stem: str | Path, *, order: Sequence[str] | None = None,
                    lang: str = "en", formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Test accuracy against corruption level, one panel per corruption, mean over seeds per method, error bars
    of one std over seeds, each method's points offset along the level axis (:func:`style.dodge`)."""
    corruptions = list(dict.fromkeys(robust["corruption"]))
    methods = [m for m in (order or dict.fromkeys(robust["method"])) if m in set(robust["method"])]
    with paper_style(lang):
        n = len(corruptions)
        fig, axes = plt.subplots(1, n, figsize=(min(TEXT_WIDTH, COLUMN_WIDTH * n * 0.75), 2.3), squeeze=False)
        levels = np.sort(robust["level"].unique().astype(float))
        step = float(np.min(np.diff(levels))) if len(levels) > 1 else math.nan
        for ax, corruption in zip(axes[0], corruptions):
            part = robust[robust["corruption"] == corruption]
            for i, method in enumerate(methods):
                stats = part[part["method"] == method].groupby("level")["accuracy"].agg(["mean", "std"]).fillna(0) * 100
                if stats.empty:
                    continue
                style = style_for(i)
                # methods side by side at each level: overlapping bars would hide each other
                x = stats.index.to_numpy(dtype=float) + dodge(i, len(methods), step)
                ax.errorbar(x, stats["mean"], yerr=stats["std"], color=style["color"], marker=style["marker"],
                            label=method if ax is axes[0][0] else None, elinewidth=0.6)
            ax.set_title(str(corruption))
            ax.set_xlabel(_axis("level", lang))
        axes[0][0].set_ylabel(_axis("accuracy", lang))
        fig.legend(loc="lower center", ncol=min(len(methods), 7), bbox_to_anchor=(0.5, -0.02))
        fig.tight_layout(rect=(0, 0.06 * math.ceil(len(methods) / 7) + 0.02, 1, 1))
        return save_figure(fig, stem, formats)


def ablation_axes(grid: Mapping[str, Sequence[Any]]) -> tuple[str, str, list[str]] | None:
    """The two grid keys a heat map shows (rows, columns) and the keys that split it into panels."""
    varied = [k for k, v in grid.items() if len(v) > 1]
    if len(varied) < 2:
        return None
    # the key with most values gives the rows (a tall map reads well in one column)
    rows = max(varied, key=lambda k: len(grid[k]))
    cols = next(k for k in varied if k != rows)
    return rows, cols, [k for k in varied if k not in (rows, cols)]


def _short(key: str) -> str:
    """``model.dropout`` -> ``dropout``, ``fusion.name`` -> ``fusion``."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def plot_ablation_heatmaps(summary: pd.DataFrame, overrides: Mapping[str, Mapping[str, Any]],
                           grid: Mapping[str, Sequence[Any]], stem: str | Path, *, metric: str = "accuracy",
                           lang: str = "en", formats: Sequence[str] = ("png", "pdf")) -> list[Path] | None:
    """Heat map of the mean metric over two grid keys (one panel per value of the other varied keys).

    ``overrides`` maps method names to their dotted overrides; ``grid`` is the spec's grid.
    Returns None when the grid varies fewer than two keys.
    """
    picked = ablation_axes(grid)
    if picked is None:
        return None
    row_key, col_key, facet_keys = picked
    means = {r.method: getattr(r, f"{metric}_mean") * 100 for r in summary.itertuples(index=False)}
    stds = {r.method: getattr(r, f"{metric}_std") * 100 for r in summary.itertuples(index=False)}
    facets = list(pd.MultiIndex.from_product([grid[k] for k in facet_keys]) if facet_keys else [()])
    if len(facets) > 6:
        facets = facets[:6]
    row_vals, col_vals = list(grid[row_key]), list(grid[col_key])
    values = np.full((len(facets), len(row_vals), len(col_vals)), np.nan)
    errors = np.full_like(values, np.nan)
    for method, over in overrides.items():
        if method not in means or row_key not in over or col_key not in over:
            continue
        facet = tuple(over.get(k) for k in facet_keys)
        if facet not in [tuple(f) if isinstance(f, tuple) else (f,) for f in facets] and facet_keys:
            continue
        fi = [tuple(f) if isinstance(f, tuple) else (f,) for f in facets].index(facet) if facet_keys else 0
        ri, ci = row_vals.index(over[row_key]), col_vals.index(over[col_key])
        values[fi, ri, ci], errors[fi, ri, ci] = means[method], stds[method]
    if np.all(np.isnan(values)):
        return None
    vmin, vmax = np.nanmin(values), np.nanmax(values)
    with paper_style(lang):
        n = len(facets)
        width = min(TEXT_WIDTH, max(COLUMN_WIDTH, 0.55 * len(col_vals) * n + 1.6))
        fig, axes = plt.subplots(1, n, figsize=(width, 0.28 * len(row_vals) + 1.0), squeeze=False, sharey=True)
        image = None
        for fi, ax in enumerate(axes[0]):
            image = ax.imshow(values[fi], cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
            ax.grid(False)
            ax.set_xticks(range(len(col_vals)), [str(v) for v in col_vals])
            ax.set_yticks(range(len(row_vals)), [str(v) for v in row_vals])
            ax.set_xlabel(_short(col_key))
            if fi == 0:
                ax.set_ylabel(_short(row_key))
            if facet_keys:
                facet = facets[fi] if isinstance(facets[fi], tuple) else (facets[fi],)
                ax.set_title(", ".join(f"{_short(k)}={v}" for k, v in zip(facet_keys, facet)))
            mid = (vmin + vmax) / 2
            for ri in range(len(row_vals)):
                for ci in range(len(col_vals)):
                    v = values[fi, ri, ci]
                    if not np.isnan(v):
                        ax.text(ci, ri, f"{v:.1f}", ha="center", va="center", fontsize=6,
                                color="white" if v < mid else "black")
        bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, pad=0.02)
        bar.set_label(_axis("accuracy", lang))
        return save_figure(fig, stem, formats)


# ----------------------------------------------------------------------------------------------
# all plots of an experiment
# ----------------------------------------------------------------------------------------------


def spec_methods(spec: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, list[Any]]]:
    """Method name -> dotted overrides, and the grid, of a stored spec (empty when it no longer parses)."""
    from fuselab.experiments.spec import parse_spec

    try:
        parsed = parse_spec(dict(spec))
    except Exception:  # noqa: BLE001 - an old spec still gets the plots that need no grid
        return {}, {}
    return {m.name: dict(m.overrides) for m in parsed.methods}, dict(spec.get("grid") or {})


def write_plots(frame: pd.DataFrame, summary: pd.DataFrame, spec: Mapping[str, Any], out: str | Path, *,
                lang: str = "en", flops: bool | str = True,
                formats: Sequence[str] = ("png", "pdf")) -> dict[str, dict[str, Any]]:
    """Every plot that the experiment's results support, in ``out``.

    Args:
        frame: finished runs (``comparison_frame``).
        summary: the ``summarize`` result.
        spec: the spec as stored.
        out: folder to write into.
        lang: language of captions (and of text in the images where a Chinese font is installed).
        flops: True counts FLOPs where not cached, ``"cached"`` uses only cached counts, False skips them.
        formats: file formats of every plot (PNG for Markdown and HTML, PDF for LaTeX; PDF embeds
            TrueType fonts, which takes about a second per plot).

    Returns:
        name -> {"files": [paths], "caption": text} for each plot written.
    """
    out = Path(out)
    img_lang = plot_lang(lang)
    order = list(summary["method"])
    plots: dict[str, dict[str, Any]] = {}
    params = {r.method: float(r.params) for r in summary.itertuples(index=False) if not math.isnan(r.params)}
    if params:
        plots["accuracy_vs_params"] = {
            "files": plot_accuracy_vs_cost(summary, params, out / "accuracy_vs_params", kind="params", lang=img_lang, formats=formats),
            "caption": text("cap_params", lang)}
    if flops:
        costs = method_flops(frame, compute=flops is True)
        if costs:
            plots["accuracy_vs_flops"] = {
                "files": plot_accuracy_vs_cost(summary, costs, out / "accuracy_vs_flops", kind="flops", lang=img_lang, formats=formats),
                "caption": text("cap_flops", lang)}
    if any((Path(p) / "history.csv").is_file() for p in frame["path"]):
        layout = curves_layout(frame, order)
        caption = text("cap_curves_multiples" if layout["small_multiples"] else "cap_curves", lang,
                       baseline=order[0] if order else "")
        if not layout["loss"] and not layout["small_multiples"]:
            caption += " " + text("cap_curves_no_loss", lang)
        plots["training_curves"] = {"files": plot_training_curves(frame, out / "training_curves", order=order, lang=img_lang, formats=formats),
                                    "caption": caption}
    robust = robustness_frame(frame)
    if not robust.empty:
        plots["robustness"] = {"files": plot_robustness(robust, out / "robustness", order=order, lang=img_lang, formats=formats),
                               "caption": text("cap_robustness", lang)}
    overrides, grid = spec_methods(spec)
    files = plot_ablation_heatmaps(summary, overrides, grid, out / "ablation_heatmap", lang=img_lang, formats=formats) if grid else None
    if files:
        rows, cols, _ = ablation_axes(grid)
        plots["ablation_heatmap"] = {"files": files, "caption": text("cap_heatmap", lang, rows=rows, cols=cols)}
    return plots
