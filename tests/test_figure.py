"""The network figure is drawn from the built model: MBT's fusion layer and bottleneck count, CEN's exchange
inside every stage, a standalone exchange after each stage, multi-scale merges, and plugin models."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor, nn

from fuselab import register_fusion
from fuselab.fusion import Merge
from fuselab.models.output import ModelOutput
from fuselab.registry import FUSIONS, MODELS
from fuselab.report.figure import describe, draw
from fuselab.train.config import make_config

VECTORS = {"a": 8, "b": 8}


def _mbt(fusion_layer: int, n_bottlenecks: int = 3) -> dict:
    return {"model": {"name": "mbt", "layers": 4, "width": 8, "heads": 2, "fusion_layer": fusion_layer,
                      "n_bottlenecks": n_bottlenecks, "features_per_token": 2},
            "fusion": {"name": "late"}, "exchange": {"name": "bottleneck"}}


def _svg(diagram, path) -> str:
    return draw(diagram, path, formats=("svg",))[0].read_text()


def test_mbt_fusion_layer_decides_which_blocks_exchange(tmp_path):
    early = describe(make_config(_mbt(0)), dims=VECTORS, num_classes=3)
    late = describe(make_config(_mbt(2)), dims=VECTORS, num_classes=3)
    for diagram, fused in ((early, ["Layer 1", "Layer 2", "Layer 3", "Layer 4"]), (late, ["Layer 3", "Layer 4"])):
        (band,) = diagram.exchanges
        assert band.name == "bottleneck" and band.wrapping and not band.inside
        lane = diagram.lanes["a"][1]
        assert [b.title for b in lane] == ["Tokens", "Layer 1", "Layer 2", "Layer 3", "Layer 4"]
        assert [lane[s].title for s in band.stages] == fused  # the blocks the bottleneck wraps, and only those
    assert _svg(early, tmp_path / "early") != _svg(late, tmp_path / "late")
    alone = describe(make_config({**_mbt(4), "control": True}), dims=VECTORS, num_classes=3)
    assert alone.exchanges == [] and len(alone.lanes["a"][1]) == 5  # fusion_layer = layers: nothing exchanged


def test_the_bottleneck_count_is_the_built_one(tmp_path):
    for n in (2, 5):
        diagram = describe(make_config(_mbt(1, n_bottlenecks=n)), dims=VECTORS, num_classes=3)
        assert diagram.exchanges[0].n_tokens == n and diagram.exchanges[0].detail == f"{n} tokens"
        assert f"bottleneck ({n} tokens)" in _svg(diagram, tmp_path / f"n{n}")
    assert diagram.lane_heads is not None and diagram.head is None and diagram.merge.title == "late"


CEN = {"model": {"name": "cen", "widths": [4, 8, 8]}, "loss": {"terms": [{"name": "ce"}, {"name": "aux-unimodal"}]}}


def test_cen_exchanges_inside_every_stage(tmp_path):
    diagram = describe(make_config(CEN), dims={"t1": 3, "t2": 3}, num_classes=2)
    assert [b.title for b in diagram.lanes["t1"][1]] == ["Conv 1", "Conv 2", "Conv 3"]
    assert [b.detail for b in diagram.lanes["t1"][1]] == ["3→4", "4→8", "8→8"]
    (exchange,) = diagram.exchanges
    assert exchange.name == "channel-exchange" and exchange.inside and exchange.stages == [0, 1, 2]
    assert exchange.n_tokens == 0 and exchange.detail == "|γ|<0.02"
    assert diagram.merge.title == "ensemble" and diagram.lane_heads is not None and diagram.head is None
    assert "shared weights" in diagram.note  # one set of convolutions for both dates
    text = _svg(diagram, tmp_path / "cen")
    assert "channel-exchange (|γ|&lt;0.02), in every stage" in text or "channel-exchange (|γ|<0.02), in every stage" in text
    off = describe(make_config({**CEN, "model": {**CEN["model"], "exchanging": False, "shared_weights": False}, "control": True}),
                   dims={"t1": 3, "t2": 3}, num_classes=2)
    assert off.exchanges == [] and off.note == ""  # private batch norms only, private convolutions


def test_a_standalone_exchange_after_each_stage_and_merges_at_every_scale():
    cfg = make_config({"model": {"name": "conv-streams", "widths": [4, 8, 8], "fuse_at": "all"},
                       "fusion": {"name": "concat"}, "exchange": {"name": "rectify"}})
    diagram = describe(cfg, dims={"x": 3, "y": 3}, num_classes=2)
    assert diagram.merge_at == [0, 1, 2] and diagram.neck.title == "FPN" and diagram.neck.detail == "3 scales"
    assert [(e.name, e.stages, e.wrapping) for e in diagram.exchanges] == [("rectify", [s], False) for s in range(3)]
    single = describe(make_config({"model": {"name": "conv-streams", "widths": [4, 8, 8], "fuse_at": 0},
                                   "fusion": {"name": "sum"}}), dims={"x": 3, "y": 3}, num_classes=2)
    assert single.merge_at == [0] and [b.title for b in single.trunk] == ["Conv 2", "Conv 3"]
    assert [b.detail for b in single.trunk] == ["4→8", "8→8"] and single.merge.title == "sum"
    necked = describe(make_config({"model": {"name": "conv-streams", "widths": [4, 8, 8], "fuse_at": 0, "neck": "aspp"},
                                   "fusion": {"name": "sum"}}), dims={"x": 3, "y": 3}, num_classes=2)
    assert [b.title for b in necked.trunk] == ["Conv 2", "Conv 3", "ASPP"] and necked.neck is None  # after the trunk
    early = describe(make_config({"model": {"name": "conv-streams", "widths": [4, 8], "fuse_at": "early", "neck": "ppm"},
                                  "fusion": {"name": "concat"}}), dims={"x": 3, "y": 2}, num_classes=2)
    assert early.merge_at == [-1] and all(s == [] for _, s in early.lanes.values())
    assert [b.title for b in early.trunk] == ["Conv 1", "Conv 2", "PPM"] and early.trunk[0].detail == "5→4"


class WholeNet(nn.Module):
    """A plugin model that is not a MultiStream."""

    def __init__(self, dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(sum(dims.values()), num_classes)

    def forward(self, x: Mapping[str, Tensor]) -> ModelOutput:
        return ModelOutput(logits=self.fc(torch.cat([x[m] for m in sorted(x)], 1)))


class Halves(Merge):
    """A plugin merge: the mean of the first halves of the inputs."""

    def __init__(self, dims: Mapping[str, int], out_dim: int | None = None) -> None:
        super().__init__(dims, out_dim)
        self.out_dim = min(self.dims.values()) // 2

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        return sum(x[:, : self.out_dim] for x in xs.values()) / len(xs)


@pytest.fixture
def plugins():
    MODELS.register("whole-net", lambda *, dims, num_classes, fusion: WholeNet(dims, num_classes))
    register_fusion("halves", Halves)
    try:
        yield
    finally:
        MODELS.unregister("whole-net")
        FUSIONS.unregister("halves")


def test_plugin_models_draw(plugins, tmp_path):
    whole = describe(make_config({"model": {"name": "whole-net"}}), dims={"left": 4, "right": 6}, num_classes=3)
    assert list(whole.lanes) == ["left", "right"] and all(stages == [] for _, stages in whole.lanes.values())
    assert whole.merge.title == "WholeNet" and whole.merge_label == "the whole model"
    text = _svg(whole, tmp_path / "whole")
    assert "WholeNet" in text and "left" in text and "right" in text
    custom = describe(make_config({
        "model": {"name": "custom-streams", "encoders": {"*": {"target": "torch.nn.Linear", "in_features": 4, "out_features": 6}}},
        "fusion": {"name": "halves"}}), dims={"left": 4, "right": 4}, num_classes=3)
    assert [b.detail for b in custom.lanes["left"][1]] == ["4→6"]  # the plugin's encoder, measured on an example
    assert custom.merge.title == "halves" and custom.head is not None
    assert "halves" in _svg(custom, tmp_path / "custom")
