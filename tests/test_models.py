from __future__ import annotations

import pytest
import torch

from fuselab.models.mlp import mlp_streams

DIMS = {"a": 5, "b": 7, "c": 3}


def _x(batch: int = 4) -> dict[str, torch.Tensor]:
    return {m: torch.randn(batch, d) for m, d in DIMS.items()}


@pytest.mark.parametrize("fuse_at", ["early", 0, 1, "last", "1"])
def test_fuse_at_positions(fuse_at):
    model = mlp_streams(dims=DIMS, num_classes=4, fusion={"name": "concat"}, hidden=8, layers=2, fuse_at=fuse_at)
    out = model(_x())
    assert out.logits.shape == (4, 4)
    assert out.features is not None


def test_early_fusion_has_no_per_stream_layers_and_mid_fusion_a_trunk():
    early = mlp_streams(dims=DIMS, num_classes=4, fusion={"name": "concat"}, hidden=8, layers=2, fuse_at="early")
    assert all(isinstance(e, torch.nn.Identity) for e in early.encoders.values())
    assert early.merge.out_dim == 15 and len(early.trunk) == 2
    mid = mlp_streams(dims=DIMS, num_classes=4, fusion={"name": "concat"}, hidden=8, layers=3, fuse_at=0)
    assert len(mid.trunk) == 2 and all(len(e) == 1 for e in mid.encoders.values())
    last = mlp_streams(dims=DIMS, num_classes=4, fusion={"name": "concat"}, hidden=8, layers=3)
    assert isinstance(last.trunk, torch.nn.Identity) and all(len(e) == 3 for e in last.encoders.values())


def test_streams_are_independent_before_the_fusion_point():
    model = mlp_streams(dims=DIMS, num_classes=4, fusion={"name": "concat"}, hidden=8, layers=2, fuse_at="last").eval()
    x = _x()
    x["a"].requires_grad_(True)
    feats = model.encoders["b"](x["b"])
    assert not feats.requires_grad or torch.autograd.grad(feats.sum(), x["a"], allow_unused=True)[0] is None


def test_late_fusion_returns_modality_logits_and_their_mean():
    model = mlp_streams(dims=DIMS, num_classes=4, fusion={"name": "late"}, hidden=8)
    out = model(_x())
    assert set(out.modality_logits) == set(DIMS)
    mean = torch.stack(list(out.modality_logits.values())).mean(0)
    assert torch.allclose(out.logits, mean)
    with pytest.raises(ValueError, match="use it with model.fuse_at=last"):
        mlp_streams(dims=DIMS, num_classes=4, fusion={"name": "late"}, fuse_at=0)


def test_modality_heads_for_the_auxiliary_loss():
    model = mlp_streams(dims=DIMS, num_classes=4, fusion={"name": "sum"}, hidden=8, modality_heads=True)
    out = model(_x())
    assert {m: lg.shape for m, lg in out.modality_logits.items()} == {m: (4, 4) for m in DIMS}


def test_bad_fuse_at():
    with pytest.raises(ValueError, match=r"model.fuse_at must be 'early', 'last' or a stage index 0..1, got 5"):
        mlp_streams(dims=DIMS, num_classes=4, fusion={"name": "concat"}, layers=2, fuse_at=5)
