"""The robustness part of an experiment's report: tables and per-modality curves drawn from the curves that
``fuselab robustness`` stored in the run folders (``runs/<id>/robustness.csv``).

The measuring (corrupting inputs, evaluating checkpoints, the robustness areas) lives in
``fuselab.experiments.robustness``; this module only reads its results and draws them, so that the
experiments package never depends on the report package.

The per-modality curves show the mean test accuracy over seeds with error bars of one standard deviation
over seeds; the methods' bars at one level are drawn side by side (offset horizontally) so that they do not
hide each other, as in seaborn's ``pointplot(dodge=...)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fuselab.experiments.robustness import experiment_robustness, legend, robustness_table, table_html, write_tables
from fuselab.report.i18n import text
from fuselab.report.style import TEXT_WIDTH, axis_label, dodge, paper_style, plot_lang, save_figure, style_for

__all__ = ["plot_modality_curves", "report_section"]


def report_section(frame: pd.DataFrame, baseline: str, out: Path, *, order: Sequence[str], heading: str,
                   plots: bool = True, lang: str = "en", formats: Sequence[str] = ("png",)) -> tuple[list[str], dict[str, Path], str]:
    """The robustness part of an experiment's report: Markdown lines, the files written under ``out`` (the
    summary table, the per-modality tables and the per-modality curves) and the summary table in HTML;
    nothing when no run has curves."""
    found = experiment_robustness(frame, baseline)
    if found is None:
        return [], {}, ""
    curves, areas = found
    key = None
    for path in frame["path"]:
        meta = Path(path) / "robustness.json"
        if meta.is_file():
            key = json.loads(meta.read_text()).get("settings")
            break
    table = robustness_table(areas, order)
    markdown, files = write_tables(out, str(out.parent.name), baseline, areas, table, key, order)
    lines = [f"## {heading}", "", markdown, ""]
    if plots:
        stem = out / "plots" / "robustness_modalities"
        written = plot_modality_curves(curves, stem, order=order, lang=plot_lang(lang), formats=formats)
        files["plot:robustness_modalities"] = next(p for p in written if p.suffix == ".png")
        lines += ["![robustness per modality](plots/robustness_modalities.png)", "",
                  f"*{text('cap_robustness_modalities', lang)}*", ""]
    lines += ["Per-modality tables: robustness.md; areas per run: robustness.csv.", ""]
    files = {f"robustness_{k}" if not k.startswith("plot:") else k: v for k, v in files.items()}
    html = table_html(table, baseline, caption=legend(key, baseline))
    return lines, files, html


def plot_modality_curves(curves: pd.DataFrame, stem: str | Path, *, order: Sequence[str] | None = None,
                         lang: str = "en", formats: Sequence[str] = ("png",)) -> list[Path]:
    """Test accuracy (%) against level: one row of panels per corruption, one column per corrupted modality,
    one line per method (mean over seeds, error bars: std over seeds, offset per method so bars do not overlap).

    Args:
        curves: rows (method, seed, corruption, modality, level, accuracy), accuracy as a fraction.
        stem: output path without suffix.
        order: methods in legend order (default: order of appearance).
        lang: language of the axis labels (``en`` | ``zh``; pass ``plot_lang(lang)`` for a font fallback).
        formats: file formats to write.

    Returns:
        the written paths.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    corruptions = list(dict.fromkeys(curves["corruption"]))
    modalities = sorted(set(curves["modality"]))
    methods = [m for m in (order or dict.fromkeys(curves["method"])) if m in set(curves["method"])]
    stats = curves.groupby(["corruption", "modality", "method", "level"])["accuracy"].agg(["mean", "std"]) * 100
    levels = np.sort(curves["level"].unique().astype(float))
    step = float(np.min(np.diff(levels))) if len(levels) > 1 else math.nan
    with paper_style(lang):
        fig, axes = plt.subplots(len(corruptions), len(modalities), squeeze=False, sharex=True, sharey="row",
                                 figsize=(TEXT_WIDTH, 1.5 * len(corruptions) + 0.6))
        for r, corruption in enumerate(corruptions):
            for c, modality in enumerate(modalities):
                ax = axes[r][c]
                for i, method in enumerate(methods):
                    key = (corruption, modality, method)
                    if key not in stats.index.droplevel("level"):
                        continue
                    line = stats.loc[key]
                    style = style_for(i)
                    x = line.index.to_numpy(dtype=float) + dodge(i, len(methods), step)
                    ax.errorbar(x, line["mean"].to_numpy(), yerr=line["std"].fillna(0.0).to_numpy(),
                                color=style["color"], marker=style["marker"], markersize=2.5, linewidth=0.9,
                                elinewidth=0.5, capsize=1.2, label=method if (r, c) == (0, 0) else None)
                if r == 0:
                    ax.set_title(str(modality))
                if c == 0:
                    ax.set_ylabel(f"{corruption}\n{axis_label('accuracy', lang)}")
                if r == len(corruptions) - 1:
                    ax.set_xlabel(axis_label("level", lang))
        fig.legend(loc="lower center", ncol=min(len(methods), 7), bbox_to_anchor=(0.5, -0.01))
        fig.tight_layout(rect=(0, 0.05 * math.ceil(len(methods) / 7) + 0.02, 1, 1))
        return save_figure(fig, stem, formats)
