"""Conv streams: shared weights in one batched pass, fusion points, multi-scale necks, dense and
classification heads, and the dense metrics."""

from __future__ import annotations

import pytest
import torch

from fuselab.data.core import IGNORE_INDEX
from fuselab.metrics import prediction_metrics, task_metrics
from fuselab.models.conv import LoopedStage, SharedStage, conv_streams
from fuselab.models.multistream import MultiScaleMerge

DIMS = {"t1": 3, "t2": 3}


def _inputs(h: int = 29, w: int = 37, b: int = 2, dims=DIMS) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {m: torch.randn(b, c, h, w) for m, c in dims.items()}


def _model(**options):
    torch.manual_seed(0)
    options.setdefault("fusion", {"name": "concat"})
    options.setdefault("widths", [8, 16, 16])
    return conv_streams(dims=options.pop("dims", DIMS), num_classes=options.pop("num_classes", 2), **options)


def test_shared_weights_run_one_batched_pass_equal_to_a_loop():
    model = _model(shared_weights=True, fuse_at="all", neck="fpn", dense=True).eval()
    steps = model.merge.steps
    assert all(isinstance(s, SharedStage) for s in steps)
    calls = []
    hook = steps[0].module.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    x = _inputs()
    with torch.no_grad():
        batched = model(x).logits
    hook.remove()
    assert calls == [4]  # one call on both modalities stacked (2 x batch 2)
    for i, step in enumerate(steps):
        steps[i] = LoopedStage(step.module)
    with torch.no_grad():
        looped = model(x).logits
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    # one set of weights: the shared model has about half the encoder parameters of the separate one
    separate = _model(shared_weights=False, fuse_at="all", neck="fpn", dense=True)
    enc = lambda m: sum(p.numel() for p in m.merge.steps.parameters())  # noqa: E731
    assert 2 * enc(model) == enc(separate)


def test_shared_weights_need_equal_channels():
    with pytest.raises(ValueError, match="same channels"):
        _model(dims={"rgb": 3, "depth": 1}, shared_weights=True)


@pytest.mark.parametrize("fuse_at", ["early", 0, 1, "last", [0, 2], "all"])
@pytest.mark.parametrize("neck", [None, "fpn", "aspp", "ppm"])
def test_dense_logits_match_the_input_size(fuse_at, neck):
    model = _model(fuse_at=fuse_at, neck=neck, dense=True, rates=[1, 2], bins=[1, 2])
    out = model(_inputs())
    assert out.logits.shape == (2, 2, 29, 37)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_multi_scale_merges_every_listed_stage():
    model = _model(fuse_at="all", fusion={"name": "abs-diff"}, neck="fpn", dense=True)
    assert isinstance(model.merge, MultiScaleMerge) and list(model.merge.merges) == ["0", "1", "2"]
    assert len(model.merge(_inputs())) == 3
    one = _model(fuse_at=[1], neck="ppm", dense=True)
    assert list(one.merge.merges) == ["1"] and len(one.merge.steps) == 2  # stage 2 is never run


def test_classification_head_and_exchange():
    model = _model(fuse_at="last", exchange={"name": "rectify"}, num_classes=5)
    assert model(_inputs()).logits.shape == (2, 5)
    ms = _model(fuse_at="all", exchange={"name": "rectify"}, num_classes=5, neck="aspp", rates=[1])
    assert ms(_inputs()).logits.shape == (2, 5)


@pytest.mark.parametrize("bad", [[3], [0, 0], "first", [True]])
def test_bad_fuse_at_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="fuse_at"):
        _model(fuse_at=bad)


def test_bad_neck_is_a_clear_error():
    with pytest.raises(ValueError, match="model.neck must be one of"):
        _model(fuse_at="all", neck="unet")


def test_change_detection_metrics_on_labelled_pixels():
    target = torch.tensor([[0, 0, 1, 1, IGNORE_INDEX, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1, 1, 1, 0]])
    m = prediction_metrics("change-detection", pred, target, 2)
    # labelled: 4 pixels, 3 right; po = 0.75, pe = (2*1 + 2*3) / 16 = 0.5 -> kappa 0.5
    assert m["accuracy"].item() == pytest.approx(0.75) and m["kappa"].item() == pytest.approx(0.5)
    assert m["f1_change"].item() == pytest.approx(0.8) and m["iou_change"].item() == pytest.approx(2 / 3)
    logits = torch.nn.functional.one_hot(pred, 2).movedim(-1, 1).float().reshape(1, 2, 2, 3) * 5
    dense = task_metrics("change-detection", logits, target.reshape(1, 2, 3), 2)
    assert dense["kappa"].item() == pytest.approx(0.5) and "loss" in dense


def test_segmentation_miou_over_present_classes():
    target = torch.tensor([0, 0, 1, 1, 2, IGNORE_INDEX])
    pred = torch.tensor([0, 1, 1, 1, 2, 3])
    m = prediction_metrics("segmentation", pred, target, 4)
    # IoU: class 0 1/2, class 1 2/3, class 2 1, class 3 absent from both -> not averaged
    assert m["miou"].item() == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["accuracy"].item() == pytest.approx(4 / 5)


def test_conv_encoder_reads_images_and_spectrograms_to_vectors():
    from fuselab.models.conv import ConvEncoder

    enc = ConvEncoder(widths=[4, 8, 12])
    assert enc(torch.randn(3, 1, 28, 28)).shape == (3, 12)
    spec = torch.randn(3, 64, 32)  # (B, T, F): one channel
    torch.testing.assert_close(enc(spec), enc(spec.unsqueeze(1)))
    enc(spec).sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
