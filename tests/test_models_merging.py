"""The one merge-and-head helper of the model builders: what it makes, and that every builder goes through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fuselab.models.conv import conv_streams
from fuselab.models.custom import custom_streams
from fuselab.models.mbt import mbt
from fuselab.models.merging import MergeAndHead, merge_and_head
from fuselab.models.mlp import mlp_streams
from fuselab.models.multistream import SingleStream


def test_a_merge_of_logits_gets_the_class_count_and_no_head():
    fusion = {"name": "late"}
    point = merge_and_head(fusion, num_classes=5)
    assert fusion == {"name": "late"}  # the section is not modified
    assert point.produces_logits and point.options == {"out_dim": 5}
    merge = point.merge({"a": 3, "b": 4})
    assert merge.out_dim == 5 and merge.produces_logits
    assert point.head(7) is None
    with pytest.raises(ValueError, match="^fusion 'late' merges logits; no logits here$"):
        merge_and_head(fusion, num_classes=5, logits_error="fusion '{name}' merges logits; no logits here")


def test_a_feature_merge_gets_a_linear_head_on_the_width_it_is_given():
    point = merge_and_head({"name": "concat"}, num_classes=3)
    assert not point.produces_logits and point.options == {}
    merge = point.merge({"a": 3, "b": 4})
    assert merge.out_dim == 7
    head = point.head(merge.out_dim, dropout=0.5)
    assert [type(m) for m in head] == [nn.Dropout, nn.Linear] and head[0].p == 0.5
    assert head[1].in_features == 7 and head[1].out_features == 3
    own = point.head(9, make=lambda width: nn.Linear(width, 2))
    assert isinstance(own, nn.Linear) and own.in_features == 9


def test_one_modality_is_a_single_stream_even_for_a_merge_of_logits():
    point = merge_and_head({"name": "late"}, num_classes=4, unimodal=True, logits_error="never raised {name}")
    assert not point.produces_logits and "out_dim" not in point.options
    merge = point.merge({"a": 6})
    assert isinstance(merge, SingleStream) and merge.out_dim == 6
    x = torch.randn(2, 6)
    assert torch.equal(merge({"a": x}), x)
    assert point.head(6)[1].out_features == 4


ENCODER = {"target": "torch.nn.Linear", "in_features": 4, "out_features": 5, "out_dim": 5}
BUILDS = {
    "mlp-streams": lambda fusion: mlp_streams(dims={"a": 4, "b": 4}, num_classes=3, fusion=fusion, hidden=8),
    "mbt": lambda fusion: mbt(dims={"a": 4, "b": 4}, num_classes=3, fusion=fusion, layers=2, width=8, heads=2, fusion_layer=0),
    "conv-streams": lambda fusion: conv_streams(dims={"a": 2, "b": 2}, num_classes=3, fusion=fusion, widths=[4, 4]),
    "custom-streams": lambda fusion: custom_streams(dims={"a": 4, "b": 4}, num_classes=3, fusion=fusion, encoders={"*": ENCODER}),
}


@pytest.mark.parametrize("builder", sorted(BUILDS))
def test_every_builder_makes_its_merge_and_head_with_the_helper(builder, monkeypatch):
    made: list[tuple[str, object]] = []
    merge, head = MergeAndHead.merge, MergeAndHead.head
    monkeypatch.setattr(MergeAndHead, "merge", lambda self, dims: made.append(("merge", dims)) or merge(self, dims))
    monkeypatch.setattr(MergeAndHead, "head", lambda self, width, **kw: made.append(("head", width)) or head(self, width, **kw))
    model = BUILDS[builder]({"name": "sum"})
    assert [kind for kind, _ in made] == ["merge", "head"]
    assert model.merge.out_dim == made[1][1]  # no trunk after a last-stage merge: the head reads the merge
    assert model.head is not None
