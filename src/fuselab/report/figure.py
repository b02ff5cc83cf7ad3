"""The network figure: a paper-style block diagram of the model a run config describes.

Legend: m modality (one lane each), s stage.

Two steps. :func:`describe` reads a run config into a :class:`Diagram` (lanes of encoder stages, exchange
operators between or across stages, where and how the streams merge, shared trunk, multi-scale neck,
head); :func:`draw` lays a Diagram out left to right with matplotlib patches and arrows only and writes SVG
and PDF. A new model family adds a describer to ``DESCRIBERS``; the drawing stays the same.

Layout: inputs in column 0, stage s of every lane in column s + 1. A standalone exchange sits between two
stage columns as a bar across the lanes; a wrapping exchange (``bottleneck``) is a band over the stages it
spans with its bottleneck tokens drawn as small squares between the lanes. A single merge takes the lanes'
outputs at its stage into one node named by its operator, followed by the shared trunk and the head;
multi-scale fusion merges at several stages below the lanes and a neck aggregates the fused maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fuselab.report.plots import paper_style, save_figure

__all__ = ["DESCRIBERS", "Block", "Diagram", "Exchange", "describe", "draw", "draw_config"]


@dataclasses.dataclass
class Block:
    """One box: a title and a second line (widths, options)."""

    title: str
    detail: str = ""


@dataclasses.dataclass
class Exchange:
    """An exchange operator: standalone after ``stages[0]``, or wrapping ``stages[0]..stages[-1]``."""

    name: str
    stages: list[int]
    wrapping: bool = False
    n_tokens: int = 0  # bottleneck tokens (drawn as squares), 0 for none
    detail: str = ""


@dataclasses.dataclass
class Diagram:
    """What the figure shows, independent of how it is laid out.

    Attributes:
        lanes: per modality (sorted), its input and its encoder stages (every lane has the same count).
        merge_at: stage indices whose outputs are merged; ``[-1]`` merges the inputs (early fusion).
        merge: the merge operator's box (its name as title).
        trunk: stages that run on the fused features.
        neck: the multi-scale neck (with several merges), else None.
        lane_heads: per-lane heads for a merge of logits (late fusion), else None.
        head: the head after the trunk / neck, else None.
        output: the last box's text.
    """

    lanes: dict[str, tuple[Block, list[Block]]]
    merge_at: list[int]
    merge: Block
    exchanges: list[Exchange] = dataclasses.field(default_factory=list)
    trunk: list[Block] = dataclasses.field(default_factory=list)
    neck: Block | None = None
    lane_heads: Block | None = None
    head: Block | None = None
    output: str = "logits"
    title: str = ""
    note: str = ""  # one line under the figure, e.g. what a stage box stands for


# ----------------------------------------------------------------------------------------------
# config -> diagram
# ----------------------------------------------------------------------------------------------


def _options_text(options: Mapping[str, Any], skip: Sequence[str] = ("name",)) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if k not in skip and v is not None)


def _merge_block(fusion: Mapping[str, Any]) -> Block:
    from fuselab.api import fusion_info

    name = str(fusion.get("name"))
    try:
        info = fusion_info(name)
        detail = "mean of logits" if info.produces_logits else _options_text(fusion)
    except Exception:  # noqa: BLE001 - an unregistered operator is still drawn by name
        detail = _options_text(fusion)
    return Block(name, detail)


def _resolve_at(fuse_at: Any, n_stages: int) -> list[int]:
    if fuse_at == "early":
        return [-1]
    if fuse_at in ("last", None):
        return [n_stages - 1]
    if fuse_at == "all":
        return list(range(n_stages))
    if isinstance(fuse_at, (list, tuple)):
        return sorted(int(s) for s in fuse_at)
    return [int(fuse_at)]


def _exchanges(section: Any, n_stages: int) -> list[Exchange]:
    """The ``exchange:`` section (DESIGN section 3), if the config has one: a mapping or a list of them.

    Keys read: ``name``; ``stages`` or ``after`` (standalone: after these stages; ``all``), or
    ``fusion_layer`` (wrapping: from this stage to the last); ``n_bottlenecks``.
    """
    if not section:
        return []
    out = []
    for item in section if isinstance(section, list) else [section]:
        item = dict(item)
        name = str(item.get("name", "exchange"))
        n_tokens = int(item.get("n_bottlenecks") or 0)
        wrapping = name in ("bottleneck", "joint-attention") or "fusion_layer" in item
        if wrapping:
            first = int(item.get("fusion_layer", 0))
            stages = list(range(first, n_stages))
        else:
            where = item.get("stages", item.get("after", "all"))
            stages = list(range(n_stages)) if where == "all" else [int(s) for s in (where if isinstance(where, list) else [where])]
        detail = f"{n_tokens} tokens" if n_tokens else _options_text(item, ("name", "stages", "after", "fusion_layer"))
        if wrapping:
            out.append(Exchange(name, stages, True, n_tokens, detail))
        else:
            out.extend(Exchange(name, [s], False, 0, detail) for s in stages if s < n_stages - 1 or len(stages) == 1)
    return out


def _describe_mlp(cfg: Mapping[str, Any], dims: Mapping[str, int], num_classes: int) -> Diagram:
    model, fusion = dict(cfg["model"]), dict(cfg["fusion"])
    hidden, layers = int(model.get("hidden", 128)), int(model.get("layers", 2))
    norm = {"layer": "LN", "batch": "BN", "none": ""}.get(str(model.get("norm", "layer")), "")
    unit = "-".join(x for x in ("Linear", norm, "ReLU") if x)
    merge = _merge_block(fusion)
    from fuselab.models.multistream import resolve_fuse_at

    k = resolve_fuse_at(model.get("fuse_at", "last"), layers)  # the model's own check and message
    lanes = {}
    for m in sorted(dims):
        stages = [Block(f"MLP {s + 1}", f"{dims[m] if s == 0 else hidden}→{hidden}") for s in range(k + 1)]
        lanes[m] = (Block(m, f"d={dims[m]}"), stages)
    late = merge.detail == "mean of logits"
    fused_in = "fused"
    trunk = [Block(f"MLP {s + 1}", f"{fused_in if s == k + 1 else hidden}→{hidden}") for s in range(k + 1, layers)]
    return Diagram(
        lanes=lanes, merge_at=[k], merge=merge, exchanges=_exchanges(cfg.get("exchange"), k + 1), trunk=trunk,
        lane_heads=Block("Linear", f"→{num_classes}") if late else None,
        head=None if late else Block("Head", f"Linear →{num_classes}"),
        output=f"{num_classes} classes", title=f"mlp-streams, fusion {merge.title}",
        note=f"MLP: {unit}-Dropout ({model.get('dropout', 0.2)})",
    )


_STAGE_TITLES = {"transformer": "Layer", "vit": "Layer", "conv": "Conv", "resnet": "Res", "mlp": "MLP"}


def _describe_generic(cfg: Mapping[str, Any], dims: Mapping[str, int], num_classes: int) -> Diagram:
    """Any staged multi-stream model: ``layers``/``depth`` stages, ``fuse_at``, ``neck``, ``exchange``."""
    model, fusion = dict(cfg["model"]), dict(cfg["fusion"])
    n = int(model.get("layers", model.get("depth", 2)))
    width = model.get("hidden", model.get("dim", model.get("width")))
    merge = _merge_block(fusion)
    at = _resolve_at(model.get("fuse_at", "last"), n)
    multi = len(at) > 1
    last = n - 1 if multi else at[-1]
    kind = _STAGE_TITLES.get(str(model.get("name", "")).split("-")[0], "Stage")
    lanes = {m: (Block(m, f"d={dims[m]}"), [Block(f"{kind} {s + 1}", f"d={width}" if width else "") for s in range(last + 1)])
             for m in sorted(dims)}
    late = merge.detail == "mean of logits"
    return Diagram(
        lanes=lanes, merge_at=at, merge=merge, exchanges=_exchanges(cfg.get("exchange"), last + 1),
        trunk=[] if multi else [Block(f"{kind} {s + 1}", "shared") for s in range(last + 1, n)],
        neck=Block(str(model.get("neck", "fpn")).upper(), f"{len(at)} scales") if multi else None,
        lane_heads=Block("Head", f"→{num_classes}") if late else None,
        head=None if late else Block("Head", f"→{num_classes}"),
        output=f"{num_classes} classes", title=f"{model.get('name')}, fusion {merge.title}",
    )


def _describe_cen(cfg: Mapping[str, Any], dims: Mapping[str, int], num_classes: int) -> Diagram:
    """CEN: conv stages (shared convolutions, private BNs), a channel exchange in every stage, a head per
    lane and the learned ensemble of their logits."""
    model = dict(cfg["model"])
    widths = [int(w) for w in model.get("widths") or [16, 32, 64]]
    exchange = dict(cfg.get("exchange") or {})
    threshold = exchange.get("threshold", model.get("threshold", 2e-2))
    shared = bool(model.get("shared_weights", True))
    lanes = {m: (Block(m, f"d={dims[m]}"), [Block(f"Conv {s + 1}", f"d={w}") for s, w in enumerate(widths)]) for m in sorted(dims)}
    exchanges = []
    if model.get("exchanging", True):
        exchanges = [Exchange("channel-exchange", [s], False, 0, f"|γ|<{threshold}") for s in range(len(widths) - 1)]
    return Diagram(
        lanes=lanes, merge_at=[len(widths) - 1], merge=Block("ensemble", "softmax(α) of the heads"), exchanges=exchanges,
        lane_heads=Block("Head", f"→{num_classes}"), output=f"{num_classes} classes", title="cen, channel exchanging",
        note=("convolutions shared by the lanes, batch norms private; " if shared else "private convolutions and batch norms; ")
        + "an exchange inside every stage",
    )


DESCRIBERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, int], int], Diagram]] = {
    "mlp-streams": _describe_mlp, "cen": _describe_cen}


def describe(cfg: Any, *, dims: Mapping[str, int] | None = None, num_classes: int | None = None) -> Diagram:
    """The diagram of the model a run config describes (the dataset is built for its widths unless given)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        plain = OmegaConf.to_container(cfg, resolve=True)
    else:
        plain = dict(cfg)
    if dims is None or num_classes is None:
        from fuselab.registry import DATASETS

        options = dict(plain["data"])
        data = DATASETS.get(options.pop("name"))(seed=int(plain.get("seed", 0)), **options)
        dims, num_classes = data.dims, data.num_classes
    describer = DESCRIBERS.get(str(plain["model"].get("name")), _describe_generic)
    return describer(plain, dims, int(num_classes))


# ----------------------------------------------------------------------------------------------
# diagram -> figure
# ----------------------------------------------------------------------------------------------

COL = 1.55  # distance between columns
BOX_W, BOX_H = 1.2, 0.52
LANE = 0.95  # distance between lanes
COLORS = {
    "input": ("#FFFFFF", "#555555"),
    "stage": ("#DCEAF7", "#2F6DA3"),
    "exchange": ("#FBE3C8", "#C26A00"),
    "merge": ("#D8F0E3", "#1E8A55"),
    "trunk": ("#E8E1F2", "#6A4C93"),
    "head": ("#F3F3F3", "#333333"),
}


def _box(ax: Any, x: float, y: float, block: Block, kind: str, *, w: float = BOX_W, h: float = BOX_H,
         rounded: bool = True) -> None:
    from matplotlib.patches import FancyBboxPatch

    face, edge = COLORS[kind]
    style = "round,pad=0.02,rounding_size=0.08" if rounded else "square,pad=0.02"
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=style, facecolor=face, edgecolor=edge,
                                linewidth=0.8, zorder=3))
    if block.detail:
        ax.text(x, y + 0.08, block.title, ha="center", va="center", fontsize=7, weight="bold", zorder=4)
        ax.text(x, y - 0.12, block.detail, ha="center", va="center", fontsize=5.5, color="#333333", zorder=4)
    else:
        ax.text(x, y, block.title, ha="center", va="center", fontsize=7, weight="bold", zorder=4)


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float], *, color: str = "#444444",
           both: bool = False, rad: float = 0.0) -> None:
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="<|-|>" if both else "-|>", mutation_scale=6,
                                 linewidth=0.7, color=color, zorder=2, shrinkA=0, shrinkB=0,
                                 connectionstyle=f"arc3,rad={rad}"))


def draw(diagram: Diagram, stem: str | Path, *, formats: Sequence[str] = ("svg", "pdf")) -> list[Path]:
    """Lay the diagram out and write ``<stem>.svg`` and ``<stem>.pdf``; returns the paths."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    names = list(diagram.lanes)
    n_lanes = len(names)
    multi = len(diagram.merge_at) > 1
    n_stages = max(len(stages) for _, stages in diagram.lanes.values()) if names else 0
    lane_y = {m: (n_lanes - 1 - i) * LANE for i, m in enumerate(names)}
    centre = (n_lanes - 1) * LANE / 2
    fuse_row = -LANE * 1.1 if multi else centre
    stage_x = lambda s: (s + 1) * COL  # noqa: E731  (column of stage s; inputs at 0)

    # columns after the lanes
    col = n_stages + 1
    x_lane_heads = None
    if diagram.lane_heads is not None:
        x_lane_heads = col * COL
        col += 1
    x_merge = col * COL if not multi else None
    if not multi:
        col += 1
    x_trunk = []
    for _ in diagram.trunk:
        x_trunk.append(col * COL)
        col += 1
    x_neck = None
    if diagram.neck is not None:
        x_neck = col * COL
        col += 1
    x_head = None
    if diagram.head is not None:
        x_head = col * COL
        col += 1
    x_out = col * COL - 0.25
    width = x_out + 0.9
    bottom = fuse_row - 0.8 if multi else -0.7
    top = (n_lanes - 1) * LANE + 0.75
    scale = min(1.0, 7.0 / (width + 0.4))  # fit the text width of a paper
    with paper_style():
        fig = plt.figure(figsize=((width + 0.4) * scale * 0.78, (top - bottom) * scale * 0.78))
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(-0.8, width - 0.4)
        ax.set_ylim(bottom, top)
        ax.set_axis_off()

        # exchanges first, so lanes draw over their bands
        standalone: dict[str, list[float]] = {}
        for ex in diagram.exchanges:
            if ex.wrapping:
                x0, x1 = stage_x(ex.stages[0]) - BOX_W / 2 - 0.12, stage_x(ex.stages[-1]) + BOX_W / 2 + 0.12
                y0, y1 = -BOX_H / 2 - 0.14, (n_lanes - 1) * LANE + BOX_H / 2 + 0.14
                face, edge = COLORS["exchange"]
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=face, edgecolor=edge, linewidth=0.8,
                                       linestyle="--", alpha=0.55, zorder=1))
                ax.text((x0 + x1) / 2, y1 + 0.1, f"{ex.name} ({ex.detail})" if ex.detail else ex.name, ha="center",
                        va="bottom", fontsize=6.5, color=edge, weight="bold")
                for s in ex.stages:  # the tokens between lanes, read and written by every lane at this stage
                    for a, b in zip(names, names[1:]):
                        ymid = (lane_y[a] + lane_y[b]) / 2
                        k = max(1, min(ex.n_tokens, 8))
                        size = 0.09
                        xs = [stage_x(s) + (i - (k - 1) / 2) * (size + 0.03) for i in range(k)]
                        for x in xs:
                            ax.add_patch(Rectangle((x - size / 2, ymid - size / 2), size, size, facecolor=edge,
                                                   edgecolor="white", linewidth=0.3, zorder=4))
                        _arrow(ax, (stage_x(s) - 0.3, lane_y[a] - BOX_H / 2), (stage_x(s) - 0.3, ymid + size), color=edge, both=True)
                        _arrow(ax, (stage_x(s) + 0.3, lane_y[b] + BOX_H / 2), (stage_x(s) + 0.3, ymid - size), color=edge, both=True)
            else:
                s = ex.stages[0]
                x = stage_x(s) + COL / 2
                y0, y1 = -BOX_H / 2, (n_lanes - 1) * LANE + BOX_H / 2
                face, edge = COLORS["exchange"]
                ax.add_patch(Rectangle((x - 0.09, y0), 0.18, y1 - y0, facecolor=face, edgecolor=edge, linewidth=0.8, zorder=3))
                standalone.setdefault(ex.name, []).append(x)
        for name, xs in standalone.items():  # one label per operator, over the exchanges it names
            face, edge = COLORS["exchange"]
            y1 = (n_lanes - 1) * LANE + BOX_H / 2
            ax.text(sum(xs) / len(xs), y1 + 0.1, name + (f" (after {len(xs)} stages)" if len(xs) > 1 else ""),
                    ha="center", va="bottom", fontsize=6.5, color=edge, weight="bold")

        # lanes: input -> stages
        last_x = {}
        for m in names:
            inp, stages = diagram.lanes[m]
            y = lane_y[m]
            _box(ax, 0, y, inp, "input", w=BOX_W * 0.8)
            prev = 0 + BOX_W * 0.4
            for s, block in enumerate(stages):
                _box(ax, stage_x(s), y, block, "stage")
                _arrow(ax, (prev, y), (stage_x(s) - BOX_W / 2, y))
                prev = stage_x(s) + BOX_W / 2
            last_x[m] = prev
            if x_lane_heads is not None:
                _box(ax, x_lane_heads, y, diagram.lane_heads, "head")
                _arrow(ax, (prev, y), (x_lane_heads - BOX_W / 2, y))
                last_x[m] = x_lane_heads + BOX_W / 2

        # merge(s)
        r = max(0.34, 0.05 * len(diagram.merge.title))  # the operator's name fits its node
        if multi:
            face, edge = COLORS["merge"]
            bus = fuse_row - r - 0.2  # the fused maps of every scale run along one line into the neck
            for s in diagram.merge_at:
                x = stage_x(s)
                ax.add_patch(Circle((x, fuse_row), r, facecolor=face, edgecolor=edge, linewidth=0.8, zorder=3))
                ax.text(x, fuse_row, diagram.merge.title, ha="center", va="center", fontsize=6, weight="bold", zorder=4)
                lowest = min(lane_y.values())
                _arrow(ax, (x, lowest - BOX_H / 2), (x, fuse_row + r), color=edge)
                ax.plot([x, x], [fuse_row - r, bus], color=edge, linewidth=0.7, zorder=2)
            ax.plot([stage_x(diagram.merge_at[0]), x_neck], [bus, bus], color=edge, linewidth=0.7, zorder=2)
            _arrow(ax, (x_neck, bus), (x_neck, fuse_row - BOX_H / 2), color=edge)
            _box(ax, x_neck, fuse_row, diagram.neck, "trunk")
            prev, y_flow = x_neck + BOX_W / 2, fuse_row
        else:
            face, edge = COLORS["merge"]
            early = diagram.merge_at == [-1]
            ax.add_patch(Circle((x_merge, centre), r, facecolor=face, edgecolor=edge, linewidth=0.9, zorder=3))
            ax.text(x_merge, centre + (0.06 if diagram.merge.detail else 0), diagram.merge.title, ha="center",
                    va="center", fontsize=6.5, weight="bold", zorder=4)
            if diagram.merge.detail:
                ax.text(x_merge, centre - r - 0.2, diagram.merge.detail, ha="center", va="top", fontsize=5.5, color=edge)
            for m in names:
                start = (last_x[m], lane_y[m])
                _arrow(ax, start, (x_merge - r * 0.95, centre + (lane_y[m] - centre) * 0.25), color="#444444")
            label = "early fusion" if early else ("late fusion" if diagram.lane_heads else f"fusion after stage {diagram.merge_at[0] + 1}")
            ax.text(x_merge, centre - r - 0.06, label, ha="center", va="top", fontsize=5.5, style="italic", color="#555555")
            prev, y_flow = x_merge + r, centre
        for x, block in zip(x_trunk, diagram.trunk):
            _box(ax, x, y_flow, block, "trunk")
            _arrow(ax, (prev, y_flow), (x - BOX_W / 2, y_flow))
            prev = x + BOX_W / 2
        if x_head is not None:
            _box(ax, x_head, y_flow, diagram.head, "head")
            _arrow(ax, (prev, y_flow), (x_head - BOX_W / 2, y_flow))
            prev = x_head + BOX_W / 2
        _arrow(ax, (prev, y_flow), (x_out, y_flow))
        ax.text(x_out + 0.05, y_flow, diagram.output, ha="left", va="center", fontsize=6.5)
        if diagram.note:
            ax.text(-0.75, bottom + 0.08, diagram.note, ha="left", va="bottom", fontsize=5.5, color="#555555")
        return save_figure(fig, stem, formats=formats)


def draw_config(cfg: Any, stem: str | Path, *, formats: Sequence[str] = ("svg", "pdf"), **kwargs: Any) -> list[Path]:
    """:func:`describe` then :func:`draw`: the figure of a run config as SVG and PDF."""
    return draw(describe(cfg, **kwargs), stem, formats=formats)
