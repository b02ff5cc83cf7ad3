"""Optimiser options of the training loop: adamw / adam / sgd (momentum, Nesterov), weight-decay groups, frozen
batch norms, and the proximal L1 step on CEN's BN scales, each against a hand computation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fuselab import create_fusion
from fuselab.data.core import DataBundle, ModalTensors
from fuselab.experiments.spec import run_id
from fuselab.losses import WeightedLoss
from fuselab.models.cen import SparseParallelNorm, cen
from fuselab.train.config import ConfigError, TrainConfig, make_config
from fuselab.train.loop import fit, make_fabric
from fuselab.train.optim import freeze_batch_norms, make_optimizer, no_decay_names, parameter_groups


def _cfg(**kw) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **kw)


def _two_sgd_steps(**kw) -> torch.Tensor:
    """A parameter at 0 after two SGD steps with the constant gradient 1, lr 0.1."""
    p = nn.Parameter(torch.zeros(1))
    model = nn.Module()
    model.p = p
    opt = make_optimizer(model, _cfg(optimizer="sgd", lr=0.1, weight_decay=0.0, **kw))
    for _ in range(2):
        p.grad = torch.ones(1)
        opt.step()
    return p.detach()


def test_sgd_uses_its_momentum_and_nesterov():
    # buffer b1 = g = 1, b2 = 0.9 b1 + g = 1.9: p = -0.1 (1 + 1.9)
    assert _two_sgd_steps(momentum=0.9).item() == pytest.approx(-0.29)
    # Nesterov steps along g + mu b: 1 + 0.9 = 1.9, then 1 + 0.9 * 1.9 = 2.71
    assert _two_sgd_steps(momentum=0.9, nesterov=True).item() == pytest.approx(-0.461)
    assert _two_sgd_steps(momentum=0.0).item() == pytest.approx(-0.2)  # plain SGD


def test_default_is_adamw_with_one_decay_on_every_parameter_and_adam_is_coupled():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = make_optimizer(model, TrainConfig())
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 1e-2 and opt.param_groups[0]["lr"] == 1e-3
    assert opt.param_groups[0]["params"] == list(model.parameters())  # same order: stored runs are unchanged
    assert type(make_optimizer(model, _cfg(optimizer="adam"))) is torch.optim.Adam
    sgd = make_optimizer(model, _cfg(optimizer="sgd", weight_decay=1e-5))
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.9
    assert sgd.param_groups[0]["weight_decay"] == 1e-5


def test_adam_adds_its_decay_to_the_gradient_and_adamw_decouples_it():
    # p = 1, zero gradient, lr 0.1, weight decay 0.5, one step, by hand:
    # adamw: p (1 - lr wd) = 0.95, and a zero gradient moves it no further;
    # adam: g = wd p = 0.5, bias-corrected m = 0.5 and sqrt(v) = 0.5, so p - lr m / sqrt(v) = 0.9
    def one_step(optimizer: str) -> float:
        model = nn.Module()
        model.p = nn.Parameter(torch.ones(1))
        opt = make_optimizer(model, _cfg(optimizer=optimizer, lr=0.1, weight_decay=0.5))
        model.p.grad = torch.zeros(1)
        opt.step()
        return model.p.item()

    assert one_step("adamw") == pytest.approx(0.95)
    assert one_step("adam") == pytest.approx(0.9, abs=1e-6)
    assert one_step("sgd") == pytest.approx(1 - 0.1 * 0.5)  # coupled too: g = wd p, first step without momentum


def test_no_decay_groups_hold_exactly_the_norms_biases_and_ensemble_weights():
    model = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8])
    modules = dict(model.named_modules())
    expected = set()
    for name, _ in model.named_parameters():
        owner, leaf = name.rsplit(".", 1)
        if isinstance(modules[owner], nn.BatchNorm2d) or leaf == "bias" or name == "merge.alpha":
            expected.add(name)
    assert no_decay_names(model) == expected
    assert "merge.alpha" in expected and "exchange.stages.0.norm.norms.t1.weight" in expected
    assert "exchange.stages.0.conv.conv.weight" not in expected and "merge.heads.t1.fc.weight" not in expected
    assert any(n.endswith("fc.bias") for n in expected)
    # through the optimiser: with a zero gradient only AdamW's decay moves a parameter, by lr * wd * p
    opt = make_optimizer(model, _cfg(no_decay_norm_bias=True, lr=0.1, weight_decay=0.5))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        factor = 1.0 if name in expected else 1 - 0.1 * 0.5
        torch.testing.assert_close(p.detach(), before[name] * factor)
    # a learned late-fusion ensemble keeps its weights undecayed too
    late = create_fusion("late", dims={"a": 4, "b": 4}, out_dim=3, weights="learned")
    assert no_decay_names(late) == {"alpha", "heads.a.bias", "heads.b.bias"}
    assert sum(len(g["params"]) for g in parameter_groups(late, 0.1)) == len(list(late.parameters()))


def test_proximal_step_soft_thresholds_the_owned_scales_to_exact_zeros():
    op = create_fusion("channel-exchange", dims={"a": 4, "b": 4}, proximal_l1=0.5)
    gammas = {"a": [0.03, -0.04, 0.01, -2.0], "b": [0.5, 0.2, -0.3, 0.049]}
    with torch.no_grad():
        for m, g in gammas.items():
            op.norms[m].weight.copy_(torch.tensor(g))
    op.proximal_step(0.1)  # amount lr * lambda = 0.05; 'a' owns channels 0-1, 'b' channels 2-3
    # by hand: sign(g) max(|g| - 0.05, 0) on the owned part, the rest untouched
    assert op.norms["a"].weight.tolist() == pytest.approx([0.0, 0.0, 0.01, -2.0])
    assert op.norms["b"].weight.tolist() == pytest.approx([0.5, 0.2, -0.25, 0.0])
    assert op.norms["a"].weight[0].item() == 0.0 and op.norms["b"].weight[3].item() == 0.0  # exact zeros
    twin = SparseParallelNorm(["a", "b"], 4, proximal_l1=0.5)  # the no-exchange twin takes the same step
    with torch.no_grad():
        for m, g in gammas.items():
            twin.norms[m].weight.copy_(torch.tensor(g))
    twin.proximal_step(0.1)
    assert torch.equal(twin.norms["a"].weight, op.norms["a"].weight)
    assert torch.equal(twin.norms["b"].weight, op.norms["b"].weight)
    off = create_fusion("channel-exchange", dims={"a": 4, "b": 4})
    before = off.norms["a"].weight.detach().clone()
    off.proximal_step(0.1)  # proximal_l1 = 0: nothing
    assert torch.equal(off.norms["a"].weight, before)
    with pytest.raises(ValueError, match="proximal_l1 must be a number >= 0"):
        create_fusion("channel-exchange", dims={"a": 4, "b": 4}, proximal_l1=-1)


def _bundle(n: int = 16) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2

    def split() -> ModalTensors:
        x = {m: torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float() for m in ("t1", "t2")}
        return ModalTensors(x, y)

    return DataBundle(train=split(), val=split(), test=split(), dims={"t1": 3, "t2": 3}, num_classes=2,
                      forms={"t1": "map", "t2": "map"})


def _fit(model: nn.Module, **kw):
    cfg = _cfg(epochs=kw.pop("epochs", 1), batch_size=8, accelerator="cpu", checkpoint=False, warmup=0.0, **kw)
    loss = WeightedLoss([{"name": "ce"}, {"name": "aux-unimodal"}])
    return fit(model, _bundle(), loss, cfg, seed=0, fabric=make_fabric(cfg), evaluate_test=False)


def _owned_scales(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for m in model.modules():
        if hasattr(m, "parts"):
            out += [m.norms[name].weight.detach()[lo:hi] for name, (lo, hi) in m.parts.items()]
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_loop_takes_the_proximal_step_after_every_optimiser_step(optimizer):
    torch.manual_seed(0)
    model = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8], proximal_l1=200.0)
    result = _fit(model, optimizer=optimizer, lr=0.01, grad_clip=0.0)
    # lr x lambda = 2 per step: every owned scale (|gamma| about 1) is exactly 0 after the first step
    assert all(torch.equal(g, torch.zeros_like(g)) for g in _owned_scales(model))
    shares = [v for k, v in result.history[-1].items() if "exchanged/" in k]
    assert shares == [0.5] * 4  # half the channels of 2 exchanges x 2 dates: exactly the owned parts
    torch.manual_seed(0)
    plain = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8])
    _fit(plain, optimizer=optimizer, lr=0.01, grad_clip=0.0)
    assert all((g != 0).all() for g in _owned_scales(plain))


def test_drift_of_the_proximal_step_is_proportional_to_lambda_under_adam():
    def drift(lam: float) -> float:
        torch.manual_seed(0)
        model = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8], proximal_l1=lam)
        start = torch.cat(_owned_scales(model)).abs().sum()
        _fit(model, optimizer="adam", lr=1e-3, weight_decay=0.0, grad_clip=0.0)
        return float(start - torch.cat(_owned_scales(model)).abs().sum())

    base = drift(0.0)
    # 2 steps, lr 1e-3 then 5e-4 (cosine without warm-up), 12 owned scales: the proximal step alone removes
    # (1e-3 + 5e-4) x lambda x 12 of L1, whatever Adam's own step did
    assert drift(1.0) - base == pytest.approx(1.5e-3 * 1.0 * 12, rel=0.02)
    assert drift(4.0) - base == pytest.approx(1.5e-3 * 4.0 * 12, rel=0.02)


def test_frozen_batch_norms_keep_their_running_statistics_while_their_scales_learn():
    torch.manual_seed(0)
    model = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8])
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms]
    scales = [m.weight.detach().clone() for m in norms]
    _fit(model, optimizer="sgd", lr=0.1, freeze_bn=True)
    for m, (mean, var, tracked) in zip(norms, stats):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert int(m.num_batches_tracked) == tracked
    assert any(not torch.equal(m.weight, s) for m, s in zip(norms, scales))  # gamma still learns
    assert sum(not torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms) > len(norms) // 2  # beta too
    torch.manual_seed(0)
    later = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8])
    _fit(later, optimizer="sgd", lr=0.1, freeze_bn=True, freeze_bn_epoch=1)  # epoch 0 still estimates them
    assert all(int(m.num_batches_tracked) == 2 for m in later.modules() if isinstance(m, nn.BatchNorm2d))
    assert freeze_batch_norms(nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 2), nn.BatchNorm2d(2))) == 2


def test_optimizer_options_are_checked_in_one_line_and_hash_only_when_set():
    with pytest.raises(ConfigError, match="'train.optimizer' must be adamw, adam or sgd, got 'rmsprop'"):
        make_config(None, ["train.optimizer=rmsprop"])
    with pytest.raises(ConfigError, match="'train.nesterov' needs train.optimizer=sgd and train.momentum > 0"):
        make_config(None, ["train.nesterov=true"])
    with pytest.raises(ConfigError, match="'train.momentum' is used by train.optimizer=sgd only"):
        make_config(None, ["train.momentum=0.5"])
    with pytest.raises(ConfigError, match=r"'train.momentum' must be in \[0, 1\)"):
        make_config(None, ["train.optimizer=sgd", "train.momentum=1.5"])
    base = run_id(make_config(None, []))
    assert run_id(make_config(None, ["train.optimizer=adamw", "train.freeze_bn=false"])) == base
    assert run_id(make_config(None, ["train.optimizer=sgd"])) != base
    assert run_id(make_config(None, ["train.no_decay_norm_bias=true"])) != base
