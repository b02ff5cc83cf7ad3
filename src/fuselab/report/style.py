"""The look of every fuselab plot and figure: sizes of a two-column paper, one palette, axis labels in the
report's language, and a writer that gives the same bytes for the same figure.

Other modules (the report's plots, the robustness curves, the network figure, a user's own plot) draw with::

    with paper_style(lang):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.5))
        ax.plot(x, y, **style_for(i))
        ax.set_xlabel(axis_label("epoch", lang))
        save_figure(fig, out / "my_plot")

Sizes are those of a two-column paper (8 pt text, 3.4 in columns, 7 in across both); the palette is Okabe
and Ito's colour-blind safe set (Okabe & Ito, "Color Universal Design", 2008), which also stays apart in grey.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "AXIS_LABELS",
    "BAND_ALPHA",
    "COLUMN_WIDTH",
    "MARKERS",
    "PALETTE",
    "PAPER_RC",
    "TEXT_WIDTH",
    "axis_label",
    "cjk_font",
    "dodge",
    "paper_style",
    "plot_lang",
    "save_figure",
    "style_for",
]

COLUMN_WIDTH = 3.4  # inches: one column of a two-column paper (IEEE / NeurIPS-like)
TEXT_WIDTH = 7.0  # inches: both columns
# Okabe-Ito: distinguishable with colour-blindness and in grey print
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h"]
BAND_ALPHA = 0.12  # +- std bands: light, so that overlapping bands of several methods stay apart

PAPER_RC: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 6.5,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "errorbar.capsize": 2,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text, accepted by paper systems
    "svg.fonttype": "none",  # text stays text in SVGs: small files, editable
    "figure.dpi": 100,
}

AXIS_LABELS: dict[str, dict[str, str]] = {
    "accuracy": {"en": "Test accuracy (%)", "zh": "测试准确率 (%)"},
    "params": {"en": "Parameters", "zh": "参数量"},
    "flops": {"en": "FLOPs per sample", "zh": "单样本 FLOPs"},
    "epoch": {"en": "Epoch", "zh": "轮次"},
    "train_loss": {"en": "Training loss", "zh": "训练损失"},
    "val_accuracy": {"en": "Validation accuracy (%)", "zh": "验证准确率 (%)"},
    "level": {"en": "Corruption level", "zh": "扰动强度"},
}

_CJK_FONTS = ("Noto Sans CJK", "Noto Serif CJK", "WenQuanYi", "Source Han", "SimHei", "Droid Sans Fallback",
              "AR PL", "Microsoft YaHei", "PingFang")


def cjk_font() -> str | None:
    """The name of an installed font that has Chinese glyphs, or None."""
    from matplotlib import font_manager

    for font in font_manager.fontManager.ttflist:
        if any(k in font.name for k in _CJK_FONTS):
            return font.name
    return None


def plot_lang(lang: str) -> str:
    """The language of text inside images: Chinese only where a font can draw it, else English."""
    return "zh" if lang == "zh" and cjk_font() else "en"


def axis_label(key: str, lang: str = "en") -> str:
    """The axis label ``key`` (one of :data:`AXIS_LABELS`) in ``lang`` (``en`` | ``zh``)."""
    return AXIS_LABELS[key][lang]


def style_for(i: int) -> dict[str, Any]:
    """Colour and marker of the ``i``-th method in legend order: the palette first, then a new marker."""
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[(i // len(PALETTE)) % len(MARKERS)]}


def dodge(i: int, n: int, step: float) -> float:
    """Horizontal offset of the ``i``-th of ``n`` series sharing x positions ``step`` apart, so that their
    error bars sit side by side: the series span at most a third of ``step``, centred on the true x."""
    if n <= 1 or not np.isfinite(step) or step <= 0:
        return 0.0
    width = step / 3
    return (i - (n - 1) / 2) * width / (n - 1)


@contextlib.contextmanager
def paper_style(lang: str = "en") -> Iterator[None]:
    """Matplotlib settings of every fuselab plot (and the network figure); with ``lang="zh"`` a Chinese font
    first where one is installed."""
    rc = dict(PAPER_RC)
    if lang == "zh" and (font := cjk_font()):
        rc["font.sans-serif"] = [font, "DejaVu Sans"]
        rc["axes.unicode_minus"] = False
    with matplotlib.rc_context(rc):
        yield


# no dates or versions in the files: a report rewritten from the same results gives the same files
_FIXED_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None}, "svg": {"Date": None}}


def save_figure(fig: plt.Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` as ``<stem>.<format>`` for each format, close it, return the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        # fixed metadata keeps files identical from one report to the next
        fig.savefig(path, format=fmt, metadata=_FIXED_METADATA.get(fmt))
        paths.append(path)
    plt.close(fig)
    return paths
