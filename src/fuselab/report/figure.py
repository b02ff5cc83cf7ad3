"""The network figure: a paper-style block diagram of a model, drawn from the built module.

Legend: m modality (one lane each), s stage.

Two steps. :func:`describe` builds the model a run config describes and :func:`describe_model` reads it into a
:class:`Diagram`, following the order of a MultiStream's forward pass: each lane's encoder stages, the
exchange part (per-lane stages, standalone exchanges between them, wrapping exchanges such as ``bottleneck``
over the blocks they wrap, exchanges inside a stage such as CEN's channel exchange), the merge (at which
stage, by which operator, read through ``fusion_info``; several for multi-scale fusion), the shared trunk,
the neck and the head. So MBT's ``fusion_layer`` and ``n_bottlenecks``, CEN's exchange placement and a
plugin's own encoders are drawn as they are built. A model that is not a MultiStream is one box the inputs
enter; a model name the registry does not know is sketched from the config (:func:`sketch`).
:func:`draw` lays a Diagram out left to right with matplotlib patches and arrows only and writes SVG and PDF.

Layout: inputs in column 0, stage s of every lane in column s + 1. A standalone exchange sits between two
stage columns as a bar across the lanes; a wrapping exchange is a band over the stages it spans with its
bottleneck tokens (if any) drawn as small squares between the lanes; an exchange inside stages is a band
over each of them. A single merge takes the lanes' outputs at its stage into one node named by its operator,
followed by the shared trunk, the neck and the head; multi-scale fusion merges at several stages below the
lanes and a neck aggregates the fused maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from fuselab.report.style import paper_style, save_figure

__all__ = ["Block", "Diagram", "Exchange", "describe", "describe_model", "draw", "draw_config", "sketch"]


@dataclasses.dataclass
class Block:
    """One box: a title and a second line (widths, options)."""

    title: str
    detail: str = ""


@dataclasses.dataclass
class Exchange:
    """An exchange operator: standalone after ``stages[0]``, wrapping ``stages[0]..stages[-1]``, or (``inside``)
    part of each of ``stages`` (e.g. CEN's exchange in every batch norm)."""

    name: str
    stages: list[int]
    wrapping: bool = False
    n_tokens: int = 0  # bottleneck tokens (drawn as squares), 0 for none
    detail: str = ""
    inside: bool = False


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
    merge_label: str = ""  # the line under the merge node; empty: early, late or after which stage


# ----------------------------------------------------------------------------------------------
# built model -> diagram
# ----------------------------------------------------------------------------------------------


def _operators() -> dict[type, str]:
    """Registered fusion operator classes and their names (plugins included)."""
    from fuselab.registry import FUSIONS

    return {FUSIONS.get(name): name for name in FUSIONS}


def _operator_detail(module: nn.Module, name: str) -> str:
    """The options of a built operator that differ from its defaults, read from the module (``n_bottlenecks``
    as a token count)."""
    from fuselab.api import fusion_info

    if isinstance(getattr(module, "n_bottlenecks", None), int):
        return f"{module.n_bottlenecks} tokens"
    if name == "channel-exchange":
        return f"|γ|<{module.threshold:g}"
    info = fusion_info(name)
    changed = {k: getattr(module, k) for k, default in info.options.items()
               if k != "out_dim" and isinstance(getattr(module, k, None), (int, float, str)) and getattr(module, k) != default}
    return _options_text(changed)


def _stage_kind(module: nn.Module) -> tuple[str, str]:
    """What a stage is (``Tokens``, ``Layer``, ``Conv``, ``MLP`` or its class) and its widths, from its layers."""
    if isinstance(getattr(module, "num_tokens", None), int):
        return "Tokens", f"{module.num_tokens} tokens"
    layers = list(module.modules())
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    if any("Attention" in type(m).__name__ for m in layers) and linears:
        return "Layer", f"d={linears[0].in_features}"
    if convs:
        return "Conv", f"{convs[0].in_channels}→{convs[-1].out_channels}"
    if linears:
        return "MLP", f"{linears[0].in_features}→{linears[-1].out_features}"
    return type(module).__name__, ""


NUMBERED = ("Layer", "Conv", "MLP")  # stage kinds whose boxes are numbered along the lanes


class _Walk:
    """Follows a MultiStream's forward order and collects the diagram's lanes (one column per stage), its
    exchanges and where they act."""

    def __init__(self, modalities: Sequence[str]) -> None:
        self.lanes: dict[str, list[Block]] = {m: [] for m in modalities}
        self.exchanges: list[Exchange] = []
        self.inside: dict[str, tuple[list[int], str]] = {}  # exchanges inside stages: name -> (columns, detail)
        self.counts: dict[str, int] = {}
        self.operators = _operators()
        self.shared = False  # some stage is one module for every lane

    @property
    def column(self) -> int:
        """The column of the last stage so far (-1: none)."""
        return max((len(blocks) for blocks in self.lanes.values()), default=0) - 1

    def blocks(self, modules: Sequence[nn.Module]) -> list[Block]:
        """The boxes of one column: the kind of its first module numbered in order (``Conv 2``), each module's
        own widths."""
        kind, _ = _stage_kind(modules[0])
        title = kind
        if kind in NUMBERED:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            title = f"{kind} {self.counts[kind]}"
        return [Block(title, _stage_kind(module)[1]) for module in modules]

    def stage(self, per_lane: Mapping[str, nn.Module]) -> None:
        """One column: each lane's own module."""
        for m, block in zip(per_lane, self.blocks(list(per_lane.values()))):
            self.lanes[m].append(block)
        self.mark_inside(list(per_lane.values()))

    def shared_stage(self, module: nn.Module) -> None:
        """One column run by one module on every lane (shared weights, or a joint step such as CEN's)."""
        self.shared = self.shared or hasattr(module, "module") or any(getattr(sub, "shared", None) is True for sub in module.modules())
        block = self.blocks([module])[0]
        for m in self.lanes:
            self.lanes[m].append(Block(block.title, block.detail))
        self.mark_inside([module])

    def mark_inside(self, modules: Sequence[nn.Module]) -> None:
        for module in modules:
            for sub in module.modules():
                name = self.operators.get(type(sub))
                if name is not None and getattr(sub, "contract", "") == "exchange":
                    columns, _ = self.inside.setdefault(name, ([], _operator_detail(sub, name)))
                    if self.column not in columns:
                        columns.append(self.column)

    def step(self, module: nn.Module) -> None:
        """A ``{m: x_m} -> {m: x'_m}`` step of the exchange part (or of a multi-scale merge)."""
        from fuselab.models.multistream import PerModality, StreamSequence

        name = self.operators.get(type(module))
        kind = getattr(module, "kind", "")
        if isinstance(module, StreamSequence):
            for step in module.steps:
                self.step(step)
        elif isinstance(module, PerModality):
            self.stage(dict(module.streams))
        elif name is not None and kind == "standalone":
            self.exchanges.append(Exchange(name, [self.column], False, 0, _operator_detail(module, name)))
        elif name is not None and kind == "wrapping":
            first = self.column + 1
            for i in range(module.depth):
                self.stage({m: module.layers[m][i] for m in module.modalities})
            detail = _operator_detail(module, name)
            self.exchanges.append(Exchange(name, list(range(first, self.column + 1)), True,
                                           int(getattr(module, "n_bottlenecks", 0) or 0), detail))
        elif isinstance(getattr(module, "stages", None), nn.ModuleList):  # e.g. CEN's joint stages
            for stage in module.stages:
                self.shared_stage(stage)
        else:  # e.g. SharedStage: one module for every lane
            self.shared_stage(module)

    def finish(self) -> None:
        """Exchanges found inside stages become bands over those stages (no tokens between the lanes)."""
        for name, (columns, detail) in self.inside.items():
            self.exchanges.append(Exchange(name, sorted(columns), True, 0, detail, inside=True))


def _merge_of(merge: nn.Module, operators: Mapping[type, str]) -> Block:
    name = operators.get(type(merge))
    if name is not None:
        detail = "combines the lanes' logits" if getattr(merge, "produces_logits", False) else _operator_detail(merge, name)
        return Block(name, detail or f"→{merge.out_dim}")
    if type(merge).__name__ == "SingleStream":
        return Block("single stream", "nothing fused")
    title = getattr(merge, "display_name", type(merge).__name__)  # e.g. CEN's ensemble
    detail = "combines the lanes' logits" if getattr(merge, "produces_logits", False) else ""
    return Block(title, detail)


NECKS = {"TopDownNeck": "FPN", "ConcatNeck": "Concat"}  # neck classes by the name a paper gives them


def _trunk_blocks(walk: _Walk, trunk: nn.Module) -> list[Block]:
    if isinstance(trunk, nn.Identity):
        return []
    units: list[nn.Module] = []
    for unit in list(trunk) if isinstance(trunk, nn.Sequential) else [trunk]:
        stages = list(unit) if isinstance(unit, nn.Sequential) else []
        units += stages if stages and all(isinstance(s, nn.Sequential) for s in stages) else [unit]  # a run of stages
    return [_neck_block(unit) if _is_neck(unit) else walk.blocks([unit])[0] for unit in units]


def _is_neck(module: nn.Module) -> bool:
    return type(module).__module__ == "fuselab.models.necks"


def _neck_block(module: nn.Module, scales: int = 1) -> Block:
    """A neck's box: its name (FPN, ASPP, PPM, Concat) and, over several fused maps, how many."""
    name = type(module).__name__
    title = NECKS.get(name, name)
    context = type(getattr(module, "context", None)).__name__
    if name == "TopDownNeck" and context in ("ASPP", "PPM"):  # the top level's context module names the neck
        title = context if scales == 1 else f"FPN+{context}"
    return Block(title, f"{scales} scales" if scales > 1 else "")


def describe_model(model: nn.Module, *, dims: Mapping[str, Any], num_classes: int, name: str = "") -> Diagram:
    """The diagram of a built model: its lanes and stages, exchanges, merge(s), trunk, neck and head, read from
    the modules themselves and the operators' ``fusion_info`` (a model that is not a MultiStream is drawn as
    one block the inputs enter)."""
    from fuselab.models.multistream import MultiScaleMerge, MultiStream

    name = name or type(model).__name__
    inputs = {m: Block(m, f"d={dims[m]}" if isinstance(dims[m], int) else "×".join(map(str, dims[m]))) for m in sorted(dims)}
    if not isinstance(model, MultiStream):
        return Diagram(lanes={m: (block, []) for m, block in inputs.items()}, merge_at=[-1],
                       merge=Block(type(model).__name__, ""), output=f"{num_classes} classes", title=name,
                       merge_label="the whole model", note=f"{name}: a model fuselab does not see into")
    walk = _Walk(model.modalities)
    per_lane = {m: list(e) if isinstance(e, nn.Sequential) else ([] if isinstance(e, nn.Identity) else [e])
                for m, e in model.encoders.items()}
    for i in range(max(len(units) for units in per_lane.values())):
        walk.stage({m: units[i] for m, units in per_lane.items() if i < len(units)})
    if model.exchange is not None:
        walk.step(model.exchange)
    merge_at = [walk.column]
    merge = model.merge
    if isinstance(merge, MultiScaleMerge):
        merge_at = []
        for s, step in enumerate(merge.steps):
            walk.step(step)
            if str(s) in merge.merges:
                merge_at.append(walk.column)
        merge = next(iter(merge.merges.values()))
    walk.finish()
    merge_block = _merge_of(merge, walk.operators)
    late = bool(getattr(merge, "produces_logits", False))
    neck = model.neck
    exchanges = ", ".join(dict.fromkeys(e.name for e in walk.exchanges))
    return Diagram(
        lanes={m: (inputs[m], walk.lanes[m]) for m in sorted(walk.lanes)}, merge_at=merge_at, merge=merge_block,
        exchanges=walk.exchanges, trunk=_trunk_blocks(walk, model.trunk),
        neck=_neck_block(neck, len(merge_at)) if neck is not None else None,
        lane_heads=Block("Head", f"→{num_classes}") if late else None,
        head=Block("Head", f"→{num_classes}") if model.head is not None else None,
        output=f"{num_classes} classes",
        title=f"{name}, fusion {merge_block.title}" + (f", exchange {exchanges}" if exchanges else ""),
        note="one module runs a stage for every lane (shared weights)" if walk.shared else "",
    )


class _Shapes:
    """What a builder needs of a dataset when only its widths are given: the widths, the class count, and zero
    inputs of those widths as the example batch of builders that measure their encoders."""

    task = "classification"

    def __init__(self, dims: Mapping[str, Any], num_classes: int) -> None:
        self.dims, self.num_classes = dict(dims), int(num_classes)
        self.train = self

    def __len__(self) -> int:
        return 2

    def take(self, index: Any) -> tuple[dict[str, Any], Any]:
        import torch

        shape = lambda d: (d,) if isinstance(d, int) else tuple(d)  # noqa: E731
        return {m: torch.zeros(len(index), *shape(d)) for m, d in self.dims.items()}, torch.zeros(len(index), dtype=torch.long)


def describe(cfg: Any, *, dims: Mapping[str, Any] | None = None, num_classes: int | None = None) -> Diagram:
    """The diagram of the model a run config describes: the model is built (for the dataset's widths, or for
    ``dims`` and ``num_classes`` when given) and drawn from its modules. A model name the registry does not
    know is sketched from the config alone (:func:`sketch`)."""
    from omegaconf import DictConfig, OmegaConf

    from fuselab.registry import MODELS
    from fuselab.train.config import make_config
    from fuselab.train.session import build_checked_model, cached_data

    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = str(plain["model"].get("name"))
    if name not in MODELS:
        return sketch(plain, dims=dims, num_classes=num_classes)
    full = cfg if isinstance(cfg, DictConfig) else make_config(plain)
    data: Any = _Shapes(dims, num_classes) if dims is not None and num_classes is not None else cached_data(full)
    model = build_checked_model(full, data)  # an option the builder rejects is one line, as a run reports it
    return describe_model(model, dims=data.dims, num_classes=int(data.num_classes), name=name)


# ----------------------------------------------------------------------------------------------
# config -> sketch (a model the registry does not know)
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


_STAGE_TITLES = {"transformer": "Layer", "vit": "Layer", "conv": "Conv", "resnet": "Res", "mlp": "MLP"}


def sketch(cfg: Mapping[str, Any], *, dims: Mapping[str, int] | None = None, num_classes: int | None = None) -> Diagram:
    """A staged multi-stream model sketched from its config alone (``layers``/``depth`` stages, ``fuse_at``,
    ``neck``, ``exchange``), for a model that cannot be built here; the dataset is built for its widths
    unless they are given."""
    if dims is None or num_classes is None:
        from fuselab.registry import DATASETS

        options = dict(cfg["data"])
        data = DATASETS.get(options.pop("name"))(seed=int(cfg.get("seed", 0)), **options)
        dims, num_classes = data.dims, data.num_classes
    model, fusion = dict(cfg["model"]), dict(cfg.get("fusion") or {"name": "concat"})
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


@dataclasses.dataclass
class _Layout:
    """Where everything goes: lane heights and the x of every column after the lanes."""

    names: list[str]
    lane_y: dict[str, float]
    centre: float
    multi: bool
    fuse_row: float
    x_lane_heads: float | None
    x_merge: float | None
    x_trunk: list[float]
    x_neck: float | None
    x_head: float | None
    x_out: float
    width: float
    bottom: float
    top: float

    @staticmethod
    def stage_x(s: int) -> float:
        """The column of stage s (inputs at 0)."""
        return (s + 1) * COL


def _layout(diagram: Diagram) -> _Layout:
    names = list(diagram.lanes)
    n_lanes = len(names)
    multi = len(diagram.merge_at) > 1
    n_stages = max((len(stages) for _, stages in diagram.lanes.values()), default=0)
    centre = (n_lanes - 1) * LANE / 2
    fuse_row = -LANE * 1.1 if multi else centre
    col = n_stages + 1

    def take(present: bool) -> float | None:
        nonlocal col
        if not present:
            return None
        col += 1
        return (col - 1) * COL

    x_lane_heads = take(diagram.lane_heads is not None)
    x_merge = take(not multi)
    x_trunk = [take(True) for _ in diagram.trunk]
    x_neck = take(diagram.neck is not None)
    x_head = take(diagram.head is not None)
    x_out = col * COL - 0.25
    return _Layout(names=names, lane_y={m: (n_lanes - 1 - i) * LANE for i, m in enumerate(names)}, centre=centre,
                   multi=multi, fuse_row=fuse_row, x_lane_heads=x_lane_heads, x_merge=x_merge,
                   x_trunk=[x for x in x_trunk if x is not None], x_neck=x_neck, x_head=x_head, x_out=x_out,
                   width=x_out + 0.9, bottom=fuse_row - 0.8 if multi else -0.7, top=(n_lanes - 1) * LANE + 0.75)


def _draw_band(ax: Any, lay: _Layout, ex: Exchange, first: int, last: int) -> tuple[float, float]:
    """The dashed band of a wrapping (or inside-stage) exchange over stages first..last; returns its top
    centre."""
    from matplotlib.patches import Rectangle

    x0, x1 = lay.stage_x(first) - BOX_W / 2 - 0.12, lay.stage_x(last) + BOX_W / 2 + 0.12
    y0, y1 = -BOX_H / 2 - 0.14, (len(lay.names) - 1) * LANE + BOX_H / 2 + 0.14
    face, edge = COLORS["exchange"]
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=face, edgecolor=edge, linewidth=0.8,
                           linestyle="--", alpha=0.55, zorder=1))
    return (x0 + x1) / 2, y1


def _draw_crossings(ax: Any, lay: _Layout, ex: Exchange) -> None:
    """At every stage of the exchange, arrows between neighbouring lanes, through the bottleneck tokens
    (small squares) when the exchange has any."""
    from matplotlib.patches import Rectangle

    edge = COLORS["exchange"][1]
    size = 0.09
    for s in ex.stages:
        for a, b in zip(lay.names, lay.names[1:]):
            ymid = (lay.lane_y[a] + lay.lane_y[b]) / 2
            k = min(ex.n_tokens, 8)
            for i in range(k):
                x = lay.stage_x(s) + (i - (k - 1) / 2) * (size + 0.03)
                ax.add_patch(Rectangle((x - size / 2, ymid - size / 2), size, size, facecolor=edge,
                                       edgecolor="white", linewidth=0.3, zorder=4))
            gap = size if k else 0.02
            _arrow(ax, (lay.stage_x(s) - 0.3, lay.lane_y[a] - BOX_H / 2), (lay.stage_x(s) - 0.3, ymid + gap), color=edge, both=True)
            _arrow(ax, (lay.stage_x(s) + 0.3, lay.lane_y[b] + BOX_H / 2), (lay.stage_x(s) + 0.3, ymid - gap), color=edge, both=True)


def _draw_exchanges(ax: Any, lay: _Layout, diagram: Diagram) -> None:
    """Exchanges first, so the lanes draw over their bands: a wrapping exchange is one band over the stages
    it spans; an exchange inside stages is a band over each of them; a standalone one a bar between two
    stage columns."""
    from matplotlib.patches import Rectangle

    face, edge = COLORS["exchange"]
    top = (len(lay.names) - 1) * LANE + BOX_H / 2
    standalone: dict[str, list[float]] = {}
    for ex in diagram.exchanges:
        label = f"{ex.name} ({ex.detail})" if ex.detail else ex.name
        if ex.inside:
            tops = [_draw_band(ax, lay, ex, s, s) for s in ex.stages]
            where = "in every stage" if len(ex.stages) > 1 else f"in stage {ex.stages[0] + 1}"
            x = sum(t[0] for t in tops) / len(tops)
            ax.text(x, tops[0][1] + 0.1, f"{label}, {where}" if len(diagram.lanes[lay.names[0]][1]) == len(ex.stages)
                    else f"{label}, in stages {', '.join(str(s + 1) for s in ex.stages)}",
                    ha="center", va="bottom", fontsize=6.5, color=edge, weight="bold")
            _draw_crossings(ax, lay, ex)
        elif ex.wrapping:
            x, y = _draw_band(ax, lay, ex, ex.stages[0], ex.stages[-1])
            ax.text(x, y + 0.1, label, ha="center", va="bottom", fontsize=6.5, color=edge, weight="bold")
            _draw_crossings(ax, lay, ex)
        else:
            x = lay.stage_x(ex.stages[0]) + COL / 2
            ax.add_patch(Rectangle((x - 0.09, -BOX_H / 2), 0.18, top + BOX_H / 2, facecolor=face, edgecolor=edge,
                                   linewidth=0.8, zorder=3))
            standalone.setdefault(ex.name, []).append(x)
    for name, xs in standalone.items():  # one label per operator, over the exchanges it names
        ax.text(sum(xs) / len(xs), top + 0.1, name + (f" (after {len(xs)} stages)" if len(xs) > 1 else ""),
                ha="center", va="bottom", fontsize=6.5, color=edge, weight="bold")


def _draw_lanes(ax: Any, lay: _Layout, diagram: Diagram) -> dict[str, float]:
    """Each lane: input -> stages (-> its head); returns where each lane's last arrow starts."""
    last_x = {}
    for m in lay.names:
        inp, stages = diagram.lanes[m]
        y = lay.lane_y[m]
        _box(ax, 0, y, inp, "input", w=BOX_W * 0.8)
        prev = 0 + BOX_W * 0.4
        for s, block in enumerate(stages):
            _box(ax, lay.stage_x(s), y, block, "stage")
            _arrow(ax, (prev, y), (lay.stage_x(s) - BOX_W / 2, y))
            prev = lay.stage_x(s) + BOX_W / 2
        last_x[m] = prev
        if lay.x_lane_heads is not None and diagram.lane_heads is not None:
            _box(ax, lay.x_lane_heads, y, diagram.lane_heads, "head")
            _arrow(ax, (prev, y), (lay.x_lane_heads - BOX_W / 2, y))
            last_x[m] = lay.x_lane_heads + BOX_W / 2
    return last_x


def _draw_multiscale(ax: Any, lay: _Layout, diagram: Diagram, r: float) -> tuple[float, float]:
    """A merge node under each fused stage, a bus along them into the neck; returns where the flow goes on."""
    from matplotlib.patches import Circle

    face, edge = COLORS["merge"]
    bus = lay.fuse_row - r - 0.2  # the fused maps of every scale run along one line into the neck
    lowest = min(lay.lane_y.values())
    for s in diagram.merge_at:
        x = lay.stage_x(s)
        ax.add_patch(Circle((x, lay.fuse_row), r, facecolor=face, edgecolor=edge, linewidth=0.8, zorder=3))
        ax.text(x, lay.fuse_row, diagram.merge.title, ha="center", va="center", fontsize=6, weight="bold", zorder=4)
        _arrow(ax, (x, lowest - BOX_H / 2), (x, lay.fuse_row + r), color=edge)
        ax.plot([x, x], [lay.fuse_row - r, bus], color=edge, linewidth=0.7, zorder=2)
    assert lay.x_neck is not None and diagram.neck is not None
    ax.plot([lay.stage_x(diagram.merge_at[0]), lay.x_neck], [bus, bus], color=edge, linewidth=0.7, zorder=2)
    _arrow(ax, (lay.x_neck, bus), (lay.x_neck, lay.fuse_row - BOX_H / 2), color=edge)
    _box(ax, lay.x_neck, lay.fuse_row, diagram.neck, "trunk")
    return lay.x_neck + BOX_W / 2, lay.fuse_row


def _draw_merge(ax: Any, lay: _Layout, diagram: Diagram, last_x: Mapping[str, float], r: float) -> tuple[float, float]:
    """The one merge node the lanes enter, labelled with where the fusion happens."""
    from matplotlib.patches import Circle

    face, edge = COLORS["merge"]
    x, centre = lay.x_merge, lay.centre
    assert x is not None
    ax.add_patch(Circle((x, centre), r, facecolor=face, edgecolor=edge, linewidth=0.9, zorder=3))
    ax.text(x, centre + (0.06 if diagram.merge.detail else 0), diagram.merge.title, ha="center", va="center",
            fontsize=6.5, weight="bold", zorder=4)
    if diagram.merge.detail:
        ax.text(x, centre - r - 0.2, diagram.merge.detail, ha="center", va="top", fontsize=5.5, color=edge)
    for m in lay.names:
        _arrow(ax, (last_x[m], lay.lane_y[m]), (x - r * 0.95, centre + (lay.lane_y[m] - centre) * 0.25), color="#444444")
    label = diagram.merge_label or ("early fusion" if diagram.merge_at == [-1] else (
        "late fusion" if diagram.lane_heads else f"fusion after stage {diagram.merge_at[0] + 1}"))
    ax.text(x, centre - r - 0.06, label, ha="center", va="top", fontsize=5.5, style="italic", color="#555555")
    return x + r, centre


def _draw_flow(ax: Any, lay: _Layout, diagram: Diagram, start: float, y: float) -> None:
    """Trunk, neck (single merge), head and the output after the merge."""
    prev = start
    for x, block in zip(lay.x_trunk, diagram.trunk):
        _box(ax, x, y, block, "trunk")
        _arrow(ax, (prev, y), (x - BOX_W / 2, y))
        prev = x + BOX_W / 2
    if not lay.multi and lay.x_neck is not None and diagram.neck is not None:  # a neck on the one fused map
        _box(ax, lay.x_neck, y, diagram.neck, "trunk")
        _arrow(ax, (prev, y), (lay.x_neck - BOX_W / 2, y))
        prev = lay.x_neck + BOX_W / 2
    if lay.x_head is not None and diagram.head is not None:
        _box(ax, lay.x_head, y, diagram.head, "head")
        _arrow(ax, (prev, y), (lay.x_head - BOX_W / 2, y))
        prev = lay.x_head + BOX_W / 2
    _arrow(ax, (prev, y), (lay.x_out, y))
    ax.text(lay.x_out + 0.05, y, diagram.output, ha="left", va="center", fontsize=6.5)


def draw(diagram: Diagram, stem: str | Path, *, formats: Sequence[str] = ("svg", "pdf")) -> list[Path]:
    """Lay the diagram out and write ``<stem>.svg`` and ``<stem>.pdf``; returns the paths."""
    import matplotlib.pyplot as plt

    lay = _layout(diagram)
    scale = min(1.0, 7.0 / (lay.width + 0.4))  # fit the text width of a paper
    with paper_style():
        fig = plt.figure(figsize=((lay.width + 0.4) * scale * 0.78, (lay.top - lay.bottom) * scale * 0.78))
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(-0.8, lay.width - 0.4)
        ax.set_ylim(lay.bottom, lay.top)
        ax.set_axis_off()
        _draw_exchanges(ax, lay, diagram)
        last_x = _draw_lanes(ax, lay, diagram)
        r = max(0.34, 0.05 * len(diagram.merge.title))  # the operator's name fits its node
        if lay.multi:
            start, y = _draw_multiscale(ax, lay, diagram, r)
        else:
            start, y = _draw_merge(ax, lay, diagram, last_x, r)
        _draw_flow(ax, lay, diagram, start, y)
        if diagram.note:
            ax.text(-0.75, lay.bottom + 0.08, diagram.note, ha="left", va="bottom", fontsize=5.5, color="#555555")
        return save_figure(fig, stem, formats=formats)


def draw_config(cfg: Any, stem: str | Path, *, formats: Sequence[str] = ("svg", "pdf"), **kwargs: Any) -> list[Path]:
    """:func:`describe` then :func:`draw`: the figure of a run config as SVG and PDF."""
    return draw(describe(cfg, **kwargs), stem, formats=formats)
