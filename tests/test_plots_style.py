"""Training curves stay readable with many methods, compare losses only on one scale, and say what the bands are."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import fuselab.report.plots as plots
from fuselab.report.i18n import text

CE = {"terms": [{"name": "ce", "weight": 1.0}]}
CE_AUX = {"terms": [{"name": "ce", "weight": 1.0}, {"name": "aux-unimodal", "weight": 0.5}]}


def _runs(tmp_path: Path, methods: list[str], losses: dict[str, dict] | None = None) -> pd.DataFrame:
    """Run folders with a history (5 epochs) and a config per method and seed; method i ends near 80 + i %."""
    rows = []
    for i, method in enumerate(methods):
        for seed in (0, 1):
            folder = tmp_path / f"{method}-{seed}"
            folder.mkdir()
            epochs = np.arange(5)
            pd.DataFrame({"epoch": epochs, "train_loss": 2.0 / (epochs + 1) + 0.01 * seed,
                          "val_accuracy": (0.5 + (0.3 + 0.01 * i) * epochs / 4 + 0.01 * seed)}).to_csv(
                folder / "history.csv", index=False)
            loss = (losses or {}).get(method, CE)
            (folder / "config.yaml").write_text(yaml.safe_dump({"loss": loss, "seed": seed}))
            rows.append({"method": method, "seed": seed, "path": str(folder)})
    return pd.DataFrame(rows)


@pytest.fixture
def captured(monkeypatch):
    """The figure each plot function was about to save, by stem name."""
    figures = {}
    real = plots.save_figure

    def save(fig, stem, formats=("png",)):
        figures[Path(stem).name] = {
            "axes": [{"title": ax.get_title(), "ylabel": ax.get_ylabel(), "visible": ax.get_visible(),
                      "lines": [(line.get_color(), line.get_linestyle()) for line in ax.get_lines()],
                      "bands": [c.get_alpha() for c in ax.collections]} for ax in fig.axes],
        }
        return real(fig, stem, formats)

    monkeypatch.setattr(plots, "save_figure", save)
    return figures


def test_six_methods_get_one_panel_each_with_the_baseline_for_reference(tmp_path, captured):
    methods = ["concat", "sum", "max", "lmf", "tfn", "gated"]
    frame = _runs(tmp_path, methods)
    layout = plots.curves_layout(frame, methods)
    assert layout["small_multiples"] and layout["methods"] == methods
    plots.plot_training_curves(frame, tmp_path / "out" / "training_curves", order=methods, formats=("png",))
    axes = captured["training_curves"]["axes"]
    visible = [a for a in axes if a["visible"]]
    assert [a["title"] for a in visible] == methods  # legend order = panel order
    assert len(axes) == 8 and sum(not a["visible"] for a in axes) == 2  # 2 x 4 grid, two empty cells hidden
    for a in visible[1:]:  # the baseline, grey and dashed, in every other panel
        assert ("0.55", "--") in a["lines"]
    assert ("0.55", "--") not in visible[0]["lines"]
    assert all(len(a["bands"]) == 1 and a["bands"][0] <= 0.3 for a in visible)  # one light band per panel
    assert (tmp_path / "out" / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_four_methods_share_two_panels_with_light_bands(tmp_path, captured):
    methods = ["concat", "sum", "max", "lmf"]
    frame = _runs(tmp_path, methods)
    assert not plots.curves_layout(frame, methods)["small_multiples"]
    plots.plot_training_curves(frame, tmp_path / "training_curves", order=methods, formats=("png",))
    loss, acc = captured["training_curves"]["axes"]
    assert loss["ylabel"] == "Training loss" and acc["ylabel"] == "Validation accuracy (%)"
    colours = [c for c, _ in acc["lines"]]
    assert colours == plots.PALETTE[:4]  # the palette in legend order
    assert acc["bands"] == [plots.BAND_ALPHA] * 4 and plots.BAND_ALPHA <= 0.15


def test_losses_of_different_configurations_are_not_drawn_on_one_axis(tmp_path, captured):
    methods = ["concat", "sum", "aux"]
    frame = _runs(tmp_path, methods, losses={"aux": CE_AUX})
    assert not plots.losses_comparable(frame)
    layout = plots.curves_layout(frame, methods)
    assert layout == {"methods": methods, "small_multiples": False, "loss": False}
    plots.plot_training_curves(frame, tmp_path / "training_curves", order=methods, formats=("png",))
    (only,) = captured["training_curves"]["axes"]
    assert only["ylabel"] == "Validation accuracy (%)"
    summary = pd.DataFrame({"method": methods, "params": [math.nan] * 3})
    written = plots.write_plots(frame, summary, {}, tmp_path / "plots", flops=False, formats=("png",))
    caption = written["training_curves"]["caption"]
    assert caption == text("cap_curves", "en") + " " + text("cap_curves_no_loss", "en")
    assert "band: ± std over seeds" in caption


def test_small_multiples_caption_names_the_baseline_and_the_band(tmp_path, captured):
    methods = ["concat", "sum", "max", "lmf", "tfn"]
    frame = _runs(tmp_path, methods)
    summary = pd.DataFrame({"method": methods, "params": [math.nan] * 5})
    written = plots.write_plots(frame, summary, {}, tmp_path / "plots", lang="zh", flops=False, formats=("png",))
    assert written["training_curves"]["caption"] == text("cap_curves_multiples", "zh", baseline="concat")
    assert "基线 concat" in written["training_curves"]["caption"] and "标准差" in written["training_curves"]["caption"]
