"""The ``mbt`` builder: information flow between streams, heads, options, config and a real run on mfeat."""

from __future__ import annotations

import pytest
import torch

from fuselab.layers import TransformerBlock
from fuselab.models.mbt import mbt
from fuselab.train.config import ConfigError, make_config
from fuselab.train.run import execute

DIMS = {"a": 12, "b": 9}


def _model(**options):
    torch.manual_seed(0)
    defaults = dict(dims=DIMS, num_classes=4, fusion={"name": "late"}, layers=4, width=8, heads=2,
                    features_per_token=3)
    return mbt(**{**defaults, **options}).eval()


def _x(batch=3):
    g = torch.Generator().manual_seed(1)
    return {m: torch.randn(batch, d, generator=g, requires_grad=True) for m, d in DIMS.items()}


def _flow_from_b_to_a(model) -> list[bool]:
    """Per block of stream a (in order): does a's part of the block output depend on b's input?"""
    n_a = model.encoders["a"][0].num_tokens
    blocks_a = [m for m in model.encoders["a"] if isinstance(m, TransformerBlock)]
    if model.exchange is not None:
        blocks_a += list(model.exchange.layers["a"])
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: outputs.append(out[:, :n_a])) for b in blocks_a]
    for b in blocks_a:  # joint attention runs a block as project() + finish(), not forward()
        b.finish = (lambda f: lambda *args: outputs.append(f(*args)) or outputs[-1])(b.finish)
    x = _x()
    model(x)
    for h in hooks:
        h.remove()
    assert len(outputs) == 4
    flows = []
    for out in outputs:
        (grad,) = torch.autograd.grad(out.sum(), x["b"], retain_graph=True, allow_unused=True)
        flows.append(grad is not None and bool(grad.abs().sum() > 0))
    return flows


@pytest.mark.parametrize("fusion_layer", [0, 1, 2, 3, 4])
def test_bottleneck_information_flow(fusion_layer):
    flows = _flow_from_b_to_a(_model(fusion_layer=fusion_layer))
    # the first bottleneck block reads the learned initial bottleneck, so b reaches a's tokens one block later
    assert flows == [i > fusion_layer for i in range(4)]


@pytest.mark.parametrize("fusion_layer", [0, 2, 4])
def test_joint_attention_information_flow(fusion_layer):
    flows = _flow_from_b_to_a(_model(fusion_layer=fusion_layer, exchange={"name": "joint-attention"}))
    assert flows == [i >= fusion_layer for i in range(4)]


def test_late_fusion_logits_of_a_never_see_b():
    model = _model(fusion_layer=4)
    assert model.exchange is None
    x = _x()
    out = model(x)
    (grad,) = torch.autograd.grad(out.modality_logits["a"].sum(), x["b"], allow_unused=True)
    assert grad is None or torch.count_nonzero(grad) == 0
    mixed = _model(fusion_layer=2)(x)
    (grad,) = torch.autograd.grad(mixed.modality_logits["a"].sum(), x["b"])
    assert grad.abs().sum() > 0
    assert torch.allclose(out.logits, torch.stack(list(out.modality_logits.values())).mean(0))  # logits averaged


def test_heads_one_and_eight_same_parameters_different_outputs():
    one, eight = _model(width=16, heads=1), _model(width=16, heads=8)
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in eight.parameters())
    eight.load_state_dict(one.state_dict())
    x = _x()
    assert not torch.allclose(one(x).logits, eight(x).logits, atol=1e-5)


def test_options_classifier_shared_weights_and_standalone_exchanges():
    x = _x()
    separate, shared = _model(), _model(shared_weights=True)
    n_sep = sum(p.numel() for p in separate.parameters())
    assert sum(p.numel() for p in shared.parameters()) < n_sep
    assert shared(x).logits.shape == (3, 4)
    assert _model(classifier="gap")(x).logits.shape == (3, 4)
    assert _model(fusion={"name": "concat"})(x).logits.shape == (3, 4)
    assert _model(exchange={"name": "cross-attention", "heads": 2})(x).logits.shape == (3, 4)
    same_counts = {"a": 12, "b": 12}
    out = _model(dims=same_counts, exchange={"name": "token-exchange"})({m: torch.randn(3, 12) for m in same_counts})
    assert any(k.endswith(".l1") for k in out.aux_losses)
    assert _model(n_bottlenecks=6).exchange.bottleneck.shape == (1, 6, 8)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"heads": 3}, r"^model.heads=3 must be a positive divisor of model.width=8$"),
        ({"fusion_layer": 5}, r"^model.fusion_layer must be in 0..4 \(0 = fuse from the first layer, 4 = no exchange\), got 5$"),
        ({"fusion_layer": -1}, r"^model.fusion_layer must be in 0..4"),
        ({"exchange": {"name": "token-exchange"}}, r"^exchange 'token-exchange' needs aligned tokens \(the same count per modality\), got \{'a': 5, 'b': 4\}$"),
        ({"classifier": "gmp"}, r"^model.classifier must be one of token, gap, got 'gmp'$"),
        ({"exchange": {"name": "concat"}}, r"^exchange 'concat' is not a token exchange"),
    ],
)
def test_bad_options_fail_with_one_clear_line(options, message):
    with pytest.raises(ValueError, match=message):
        _model(**options)


def test_config_exchange_section():
    cfg = make_config(None, ["model.name=mbt", "exchange.name=joint-attention", "fusion.name=late"])
    assert cfg.exchange.name == "joint-attention"
    with pytest.raises(ConfigError, match="model 'mlp-streams' takes no exchange section"):
        make_config(None, ["exchange.name=bottleneck"])
    with pytest.raises(ConfigError, match="exchange.name 'concat' is a merge"):
        make_config(None, ["model.name=mbt", "exchange.name=concat"])
    with pytest.raises(ConfigError, match="unknown config key 'exchange.width'"):
        make_config(None, ["model.name=mbt", "exchange.name=bottleneck", "exchange.width=3"])
    with pytest.raises(ConfigError, match="fusion_layer must be in 0..2"):
        execute(make_config(None, ["model.name=mbt", "model.layers=2", "model.fusion_layer=3", "data.views=[fou,kar]"]))


def test_mbt_learns_mfeat_from_the_cli_config():
    cfg = make_config(None, [
        "model.name=mbt", "model.width=32", "model.heads=4", "model.layers=2", "model.fusion_layer=1",
        "model.features_per_token=8", "fusion.name=late", "data.views=[fou,kar,zer]",
        "train.epochs=6", "train.batch_size=64", "train.lr=2e-3", "train.threads=1", "train.checkpoint=false",
    ])
    result = execute(cfg)
    assert result.metrics["test_accuracy"] > 0.8  # chance is 0.10
