"""CEN: the channel-exchange operator (2 and 3 modalities, unequal widths), its sparsity term, the ``cen``
builder (shared convolutions, private BNs, ensemble), its use in a network of one's own, and a real run."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from fuselab import create_fusion, fusion_info
from fuselab.losses import WeightedLoss
from fuselab.models.cen import CENEnsemble, ParallelConv, cen
from fuselab.models.output import ModelOutput
from fuselab.train.config import ConfigError, make_config
from fuselab.train.run import execute

B, C, H, W = 4, 8, 5, 5


def _maps(dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, d, H, W, generator=g) * 3 + 1 for m, d in dims.items()}


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Batch norm in training mode, by hand."""
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_a_channel_with_zero_scale_receives_the_mean_of_the_others(names):
    op = create_fusion("channel-exchange", dims={m: C for m in names})
    with torch.no_grad():
        for m in names:
            op.norms[m].weight.uniform_(0.5, 1.5)
            op.norms[m].bias.uniform_(-1, 1)
        op.norms["a"].weight[[2, 5]] = 0.0  # channels 2 and 5 of 'a' are exchanged
        op.norms["b"].weight[6] = 0.01  # below the threshold 2e-2 too
    xs = _maps({m: C for m in names})
    out = op(xs)
    normed = {m: _bn(xs[m], op.norms[m]) for m in names}
    others_a = torch.stack([normed[m] for m in names if m != "a"]).mean(0)
    others_b = torch.stack([normed[m] for m in names if m != "b"]).mean(0)
    for k in range(C):
        expected_a = others_a[:, k] if k in (2, 5) else normed["a"][:, k]
        expected_b = others_b[:, k] if k == 6 else normed["b"][:, k]
        torch.testing.assert_close(out["a"][:, k], expected_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["b"][:, k], expected_b, rtol=1e-5, atol=1e-5)
    if len(names) == 3:  # nothing below the threshold in 'c': untouched (its own normalised map)
        torch.testing.assert_close(out["c"], normed["c"], rtol=1e-5, atol=1e-5)
    else:  # two modalities: exactly the official swap
        torch.testing.assert_close(out["a"][:, 5], normed["b"][:, 5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_the_threshold_is_strict_and_compares_the_magnitude_of_the_scale(names):
    # 0.25 is exact in float32, so "at the threshold" is exact: kept (|gamma| < threshold, as the official code)
    op = create_fusion("channel-exchange", dims={m: C for m in names}, threshold=0.25)
    with torch.no_grad():
        for m in names:
            op.norms[m].weight.fill_(1.0)
        op.norms["a"].weight[[0, 1, 2, 3, 4]] = torch.tensor([0.25, -0.25, -1.0, -0.1, 0.1])
    assert op.exchanged()["a"].tolist() == [False, False, False, True, True, False, False, False]
    assert not op.exchanged()["b"].any()
    assert op.epoch_stats()["exchanged/a"] == pytest.approx(2 / C)
    xs = _maps({m: C for m in names})
    out = op(xs)
    normed = {m: _bn(xs[m], op.norms[m]) for m in names}
    others = torch.stack([normed[m] for m in names if m != "a"]).mean(0)
    for k in range(C):  # at the threshold (+-0.25) and a large negative scale: own; small +-0.1: received
        expected = others[:, k] if k in (3, 4) else normed["a"][:, k]
        torch.testing.assert_close(out["a"][:, k], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["b"], normed["b"], rtol=1e-5, atol=1e-5)


def test_exchanged_channels_pass_their_gradient_to_the_sender():
    op = create_fusion("channel-exchange", dims={"a": C, "b": C})
    with torch.no_grad():
        op.norms["a"].weight[3] = 0.0
    xs = {m: v.requires_grad_(True) for m, v in _maps({"a": C, "b": C}).items()}
    op(xs)["a"][:, 3].sum().backward()  # a's channel 3 is b's normalised channel 3
    assert xs["a"].grad.abs().sum() == 0
    assert xs["b"].grad[:, 3].abs().sum() > 0 and xs["b"].grad[:, [0, 1, 2, 4]].abs().sum() == 0


def test_unequal_widths_exchange_where_another_modality_has_the_channel():
    dims = {"a": 4, "b": 6, "c": 8}
    op = create_fusion("channel-exchange", dims=dims)
    with torch.no_grad():
        op.norms["c"].weight[[1, 7]] = 0.0  # channel 7 exists only in c: it keeps its own value
    xs = _maps(dims)
    out = op(xs)
    normed = {m: _bn(xs[m], op.norms[m]) for m in dims}
    torch.testing.assert_close(out["c"][:, 1], (normed["a"][:, 1] + normed["b"][:, 1]) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["c"][:, 7], normed["c"][:, 7], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_sparsity_term_covers_one_disjoint_part_per_modality(names):
    op = create_fusion("channel-exchange", dims={m: 12 for m in names})
    value = op.aux_losses()["cen_sparsity"]
    assert value.item() == pytest.approx(12.0)  # every |gamma| starts at 1: 12 / M channels per modality, M parts
    value.backward()
    n = len(names)
    owned = torch.zeros(n, 12)
    for i, m in enumerate(names):
        grad = op.norms[m].weight.grad
        part = slice(i * 12 // n, (i + 1) * 12 // n)
        assert torch.equal(grad[part], torch.ones(12 // n))  # d|gamma|/dgamma = sign(gamma) = 1
        rest = torch.ones(12, dtype=torch.bool)
        rest[part] = False
        assert torch.equal(grad[rest], torch.zeros(12 - 12 // n))  # zero outside its part
        owned[i, part] = 1
    assert torch.equal(owned.sum(0), torch.ones(12))  # the parts are disjoint and cover every channel
    assert op.norms["a"].bias.grad is None


def test_channel_exchange_metadata_and_bad_options():
    info = fusion_info("channel-exchange")
    assert (info.contract, info.kind, info.forms) == ("exchange", "standalone", ("map",))
    assert info.options == {"threshold": 2e-2, "proximal_l1": 0.0}
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        create_fusion("channel-exchange", dims={"a": 4, "b": 4}, threshold=-1)
    with pytest.raises(ValueError, match="every width must be >= 3"):
        create_fusion("channel-exchange", dims={"a": 2, "b": 4, "c": 4})


def test_cen_sparsity_loss_term_reads_the_models_exchanges():
    model = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8])
    out = model({"t1": torch.randn(2, 3, 8, 8), "t2": torch.randn(2, 3, 8, 8)})
    assert sorted(out.aux_losses) == ["exchange.stages.0.norm.cen_sparsity", "exchange.stages.1.0.norm1.cen_sparsity"]
    loss = WeightedLoss([{"name": "cen-sparsity", "weight": 2e-4}])
    total, values = loss(out, torch.zeros(2, dtype=torch.long))
    assert values["cen-sparsity"].item() == pytest.approx(4 + 8)  # half of each modality's channels at |gamma| = 1
    assert total.item() == pytest.approx(2e-4 * 12)
    plain = ModelOutput(logits=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="needs a model with a channel-exchange"):
        loss(plain, torch.zeros(2, dtype=torch.long))


def test_cen_convolutions_are_shared_and_batch_norms_private():
    model = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8])
    names = [n for n, _ in model.named_parameters()]
    assert any("stages.0.conv.conv.weight" in n for n in names)  # one stem conv for both
    assert not any(".convs." in n for n in names)
    assert any("norms.t1" in n for n in names) and any("norms.t2" in n for n in names)
    private = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8], shared_weights=False)
    assert sum(p.numel() for p in private.parameters()) > sum(p.numel() for p in model.parameters())
    # the shared pass over the stacked modalities equals running the one conv on each modality
    conv = ParallelConv(["a", "b"], lambda _: nn.Conv2d(3, 4, 3, padding=1), shared=True)
    xs = {"a": torch.randn(2, 3, 6, 6), "b": torch.randn(2, 3, 6, 6)}
    out = conv(xs)
    for m in xs:
        torch.testing.assert_close(out[m], conv.conv(xs[m]))


def test_cen_ensemble_weights_sum_to_one_and_mix_detached_logits():
    ens = CENEnsemble({m: nn.Linear(4, 3) for m in ("a", "b", "c")}, dense=False, detach=True)
    with torch.no_grad():
        ens.alpha.copy_(torch.tensor([0.3, -1.0, 2.0]))
    w = ens.weights()
    e = torch.tensor([0.3, -1.0, 2.0]).exp()
    torch.testing.assert_close(w, e / e.sum())  # the softmax of alpha, by hand
    torch.testing.assert_close(ens.weights(["a", "c"]), e[[0, 2]] / e[[0, 2]].sum())  # renormalised over a, c
    xs = {m: torch.randn(5, 4) for m in ("a", "b", "c")}
    logits = ens.modality_logits(xs)
    mixed = ens.combine(logits)
    torch.testing.assert_close(mixed, sum(w[i] * logits[m] for i, m in enumerate(("a", "b", "c"))))
    mixed.sum().backward()
    assert ens.alpha.grad is not None and ens.alpha.grad.abs().sum() > 0
    assert all(ens.heads[m].weight.grad is None for m in ("a", "b", "c"))  # the ensemble trains only alpha


@pytest.mark.parametrize("n", [2, 3])
def test_cen_dense_and_classification_outputs(n):
    dims = {f"m{i}": 3 for i in range(n)}
    xs = {m: torch.randn(2, 3, 16, 16) for m in dims}
    dense = cen(dims=dims, num_classes=2, widths=[4, 8, 8], dense=True)(xs)
    assert dense.logits.shape == (2, 2, 16, 16)
    assert sorted(dense.modality_logits) == sorted(dims) and all(v.shape == (2, 2, 16, 16) for v in dense.modality_logits.values())
    pooled_model = cen(dims=dims, num_classes=5, widths=[4, 8]).eval()
    pooled = pooled_model(xs)
    assert pooled.logits.shape == (2, 5)
    # the output is the ensemble of the per-modality logits, weighted by the softmax of alpha, for every modality
    w = pooled_model.merge.weights()
    torch.testing.assert_close(pooled.logits, sum(w[i] * pooled.modality_logits[m] for i, m in enumerate(sorted(dims))))
    assert sorted(pooled.modality_logits) == sorted(dims)
    for out in (dense, pooled):  # equal initial ensemble weights: the logits are the mean of the heads' logits
        torch.testing.assert_close(out.logits, torch.stack(list(out.modality_logits.values())).mean(0))
        heads = list(out.modality_logits.values())
        assert all(not torch.allclose(heads[0], h) for h in heads[1:])  # each head sees its own modality


def test_channel_exchange_in_a_network_of_ones_own():
    class TwoStream(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # shared by both streams
            self.exchange = create_fusion("channel-exchange", dims={"rgb": 8, "depth": 8})
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            h = self.exchange({m: self.conv(v) for m, v in x.items()})
            return self.head(torch.cat([F.relu(h[m]).mean((2, 3)) for m in ("rgb", "depth")], 1))

    net = TwoStream()
    x = {"rgb": torch.randn(4, 3, 8, 8), "depth": torch.randn(4, 3, 8, 8)}
    y = torch.tensor([0, 1, 0, 1])
    loss = F.cross_entropy(net(x), y) + 2e-4 * net.exchange.aux_losses()["cen_sparsity"]
    loss.backward()
    assert net.conv.weight.grad.abs().sum() > 0
    assert all(net.exchange.norms[m].weight.grad.abs().sum() > 0 for m in ("rgb", "depth"))


def test_cen_needs_its_unimodal_loss_term(data_root, tmp_path):
    cfg = make_config({"data": {"name": "landsat-cd", "fold": 0}, "model": {"name": "cen", "widths": [4, 8]},
                       "loss": {"terms": [{"name": "dense-ce"}]}, "train": {"epochs": 1}},
                      [f"data.data_root={data_root}"])
    with pytest.raises(ConfigError, match="needs loss term 'aux-unimodal'"):
        execute(cfg, tmp_path / "run")


def test_small_real_cen_run_on_landsat_reaches_kappa_well_above_zero(data_root, tmp_path):
    cfg = make_config({
        "data": {"name": "landsat-cd", "fold": 0, "difference": True},
        "model": {"name": "cen", "widths": [8, 16]},
        "loss": {"terms": [{"name": "dense-ce"}, {"name": "aux-unimodal"}, {"name": "cen-sparsity", "weight": 2e-2}]},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "threads": 1},
    }, [f"data.data_root={data_root}"])
    result = execute(cfg, tmp_path / "run")
    assert result.metrics["test_kappa"] > 0.5, result.metrics  # chance is 0
    row = result.history[-1]
    shares = [v for k, v in row.items() if "exchanged/" in k]
    assert len(shares) == 2 * 3  # 2 exchanges x 3 streams (t1, t2, diff)
    # a share counts channels: k / 8 in the first stage, k / 16 in the second (not a mean of scales)
    assert all(min(abs(v * c - round(v * c)) for c in (8, 16)) < 1e-6 for v in shares), shares
    assert row["train_cen-sparsity"] < result.history[0]["train_cen-sparsity"]  # the L1 term shrinks the scales


def test_switching_the_exchange_off_keeps_the_network_and_its_sparsity_term():
    xs = {"t1": torch.randn(2, 3, 8, 8), "t2": torch.randn(2, 3, 8, 8)}
    on = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8])
    off = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8], exchanging=False)
    # the same parameters and buffers, name for name and shape for shape
    assert {k: v.shape for k, v in off.state_dict().items()} == {k: v.shape for k, v in on.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct batch norms per date, every |scale| above the threshold
        for m in on.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g), m.bias.uniform_(-1, 1, generator=g)
                m.running_mean.uniform_(-1, 1, generator=g), m.running_var.uniform_(0.5, 2, generator=g)
    off.load_state_dict(on.state_dict())
    assert all(torch.equal(v, on.state_dict()[k]) for k, v in off.state_dict().items())
    on.eval(), off.eval()
    torch.testing.assert_close(on(xs).logits, off(xs).logits)  # nothing below the threshold: the same network
    with torch.no_grad():
        for m in on.modules():
            if hasattr(m, "threshold"):
                m.norms["t1"].weight[0] = 0.0  # would be exchanged by 'on'
        off.load_state_dict(on.state_dict())
    on.eval(), off.eval()
    assert not torch.allclose(on(xs).logits, off(xs).logits)
    assert off(xs).aux_losses.keys() == on(xs).aux_losses.keys()
    torch.testing.assert_close(torch.stack(list(off(xs).aux_losses.values())), torch.stack(list(on(xs).aux_losses.values())))


def test_aux_unimodal_sums_the_heads_losses_as_the_official_cen_loss():
    g = torch.Generator().manual_seed(0)
    heads = {m: torch.randn(6, 3, generator=g) for m in ("a", "b", "c")}
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = ModelOutput(logits=torch.zeros(6, 3), modality_logits=heads)
    by_hand = [F.cross_entropy(v, y) for v in heads.values()]
    summed = WeightedLoss([{"name": "aux-unimodal", "reduction": "sum"}])(out, y)[0]
    mean = WeightedLoss([{"name": "aux-unimodal"}])(out, y)[0]
    torch.testing.assert_close(summed, sum(by_hand))
    torch.testing.assert_close(mean, sum(by_hand) / 3)  # the default is unchanged
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        WeightedLoss([{"name": "aux-unimodal", "reduction": "max"}])


def test_the_shipped_official_recipe_exchanges_in_every_stage_on_landsat(data_root, tmp_path):
    from fuselab.experiments.spec import load_spec

    planned = next(r for r in load_spec("cen-official").plan() if r.method == "cen" and r.seed == 0)
    cfg = make_config(OmegaConf.to_container(planned.config), [f"data.data_root={data_root}", "data.fold=0",
                                                               "train.threads=1"])
    result = execute(cfg, tmp_path / "run")
    assert result.metrics["test_kappa"] > 0.8, result.metrics  # chance is 0
    last = result.history[-1]
    owned = {k: v for k, v in last.items() if "exchanged_owned/" in k}
    assert len(owned) == 3 * 2  # 3 stages x 2 dates
    assert all(v >= 0.3 for v in owned.values()), owned  # the bar: >= 0.3 of the owned channels
    assert all(v == 0.0 for k, v in result.history[0].items() if "exchanged_owned/" in k)  # none at the start


def test_the_no_exchange_twin_checks_and_applies_its_proximal_step_by_hand():
    from fuselab.models.cen import SparseParallelNorm

    off = SparseParallelNorm(["a", "b"], 4)  # proximal_l1 defaults to 0: the step changes nothing
    before = {m: off.norms[m].weight.detach().clone() for m in ("a", "b")}
    with torch.no_grad():
        off.norms["a"].weight.copy_(torch.tensor([0.03, -0.04, 0.5, -2.0]))
    before["a"] = off.norms["a"].weight.detach().clone()
    off.proximal_step(1.0)
    assert off.proximal_l1 == 0.0 and all(torch.equal(off.norms[m].weight, before[m]) for m in ("a", "b"))
    with pytest.raises(ValueError, match=r"^cen: proximal_l1 must be a number >= 0 \(0 = off\), got -1$"):
        SparseParallelNorm(["a", "b"], 4, proximal_l1=-1)
    on = SparseParallelNorm(["a", "b", "c"], 6, proximal_l1=0.25)
    with torch.no_grad():  # a owns channels 0-1, b 2-3, c 4-5; negative scales shrink towards zero too
        on.norms["a"].weight.copy_(torch.tensor([-0.3, 0.01, -0.3, 0.3, 5.0, -5.0]))
        on.norms["c"].weight.copy_(torch.tensor([0.3, 0.3, 0.3, 0.3, -0.12, 0.3]))
    on.proximal_step(0.4)  # amount 0.1
    assert on.norms["a"].weight.tolist() == pytest.approx([-0.2, 0.0, -0.3, 0.3, 5.0, -5.0])
    assert on.norms["c"].weight.tolist() == pytest.approx([0.3, 0.3, 0.3, 0.3, -0.02, 0.2])
    assert on.norms["b"].weight.tolist() == pytest.approx([1.0, 1.0, 0.9, 0.9, 1.0, 1.0])
    assert on.aux_losses()["cen_sparsity"].item() == pytest.approx(0.2 + 0.0 + 0.9 + 0.9 + 0.02 + 0.2)


def test_fusion_stats_count_the_exchanged_channels_of_all_modalities_by_hand():
    op = create_fusion("channel-exchange", dims={"a": 4, "b": 6, "c": 8}, threshold=0.1)
    with torch.no_grad():
        op.norms["a"].weight[[0, 3]] = torch.tensor([-0.05, 0.0])  # 2 of 4
        op.norms["c"].weight[7] = 0.09  # 1 of 8; channel 7 is c's own part
    stats = op.fusion_stats({m: torch.zeros(2, d, 3, 3) for m, d in op.dims.items()})
    assert stats["exchanged"] == pytest.approx(3 / 18)  # 3 of all 4 + 6 + 8 channels, not a mean of shares
    assert stats["exchanged/a"] == pytest.approx(2 / 4) and stats["exchanged/b"] == 0.0
    assert stats["exchanged/c"] == pytest.approx(1 / 8)
    assert op.parts == {"a": (0, 1), "b": (2, 4), "c": (5, 8)}
    assert stats["exchanged_owned/a"] == 1.0 and stats["exchanged_owned/c"] == pytest.approx(1 / 3)
    assert op.carry_stat == "exchanged"


@pytest.mark.parametrize(
    ("model", "exchange", "problem"),
    [
        ({}, {}, None),
        ({"exchanging": True}, {}, None),
        ({"exchanging": False}, {}, "model.exchanging=false: CEN then exchanges no channel"),
        ({"threshold": 0}, {}, r"model.threshold=0: no \|BN scale\| is below it, so CEN exchanges no channel; use"),
        ({"threshold": -0.5}, {}, "model.threshold=-0.5: no"),
        ({"threshold": 1e-3}, {}, None),
        ({"threshold": 0.0}, {"threshold": 0.02}, None),  # the exchange's threshold overrides the model's
        ({"threshold": 0.02}, {"threshold": 0.0}, "model.threshold=0.0: no"),
        ({"threshold": False}, {}, None),  # not a number: left to the builder's own check
    ],
)
def test_cen_names_the_configs_that_exchange_nothing(model, exchange, problem):
    found = cen.fusion_problem(model, exchange)
    if problem is None:
        assert found is None
    else:
        assert found is not None and re.match(problem, found), found
    if model.get("exchanging") is False:
        assert found == ("model.exchanging=false: CEN then exchanges no channel and each stream sees only its own "
                         "modality until the ensemble (the no-exchange ablation)")
    elif problem is not None:
        assert found.endswith("so CEN exchanges no channel; use a threshold above 0 (the paper's 2e-2)"), found


def test_channel_exchange_proximal_step_soft_thresholds_only_the_owned_scales():
    op = create_fusion("channel-exchange", dims={"a": 4, "b": 6}, proximal_l1=2.0)
    with torch.no_grad():  # a owns channels 0-1 of its 4, b owns channels 3-5 of its 6
        op.norms["a"].weight.copy_(torch.tensor([-0.5, 0.05, -0.5, 0.01]))
        op.norms["b"].weight.copy_(torch.tensor([0.5, -0.5, 0.5, -0.5, 0.08, 0.3]))
    assert op.parts == {"a": (0, 2), "b": (3, 6)}
    op.proximal_step(0.05)  # amount lr * lambda = 0.1
    assert op.norms["a"].weight.tolist() == pytest.approx([-0.4, 0.0, -0.5, 0.01])
    assert op.norms["b"].weight.tolist() == pytest.approx([0.5, -0.5, 0.5, -0.4, 0.0, 0.2])
    assert op.exchanged()["a"].tolist() == [False, True, False, True]  # the new zero; 0.01 < 2e-2 untouched


def test_private_convolutions_run_each_modality_through_its_own():
    torch.manual_seed(0)
    conv = ParallelConv(["a", "b"], lambda m: nn.Conv2d(3 if m == "a" else 2, 4, 1), shared=False)
    xs = {"b": torch.randn(2, 2, 5, 5), "a": torch.randn(2, 3, 5, 5)}
    out = conv(xs)
    assert list(out) == ["b", "a"]
    for m in xs:
        torch.testing.assert_close(out[m], conv.convs[m](xs[m]))


@pytest.mark.parametrize(("in_channels", "stride"), [(4, 1), (4, 2), (3, 1)])
def test_cen_block_adds_its_input_or_its_projection_before_the_last_relu(in_channels, stride):
    from fuselab.models.cen import CENBlock

    torch.manual_seed(0)
    block = CENBlock(["a", "b"], in_channels, 4, stride=stride, shared=True, exchanging=True, threshold=0.02)
    assert (block.project is None) == (in_channels == 4 and stride == 1)
    xs = {m: torch.randn(2, in_channels, 6, 6) for m in ("a", "b")}
    h = block.norm2(block.conv2({m: torch.relu(v) for m, v in block.norm1(block.conv1(xs)).items()}))
    skip = xs if block.project is None else block.project_norm(block.project(xs))
    out = block(xs)
    for m in xs:
        torch.testing.assert_close(out[m], torch.relu(h[m] + skip[m]))
    deep = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8], blocks=2)
    assert [b.project is None for b in deep.exchange.stages[1]] == [False, True]  # stride 2, then identity
    assert deep({m: torch.randn(2, 3, 8, 8) for m in ("t1", "t2")}).logits.shape == (2, 2)


def test_dense_heads_return_logits_at_the_requested_size():
    from fuselab.models.cen import DenseModalityHead

    head = DenseModalityHead([4, 8], 4, 3, dropout=0.0).eval()
    maps = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    assert head(maps).shape == (2, 3, 8, 8)  # the finest stage's size without a request
    assert head(maps, size=(12, 10)).shape == (2, 3, 12, 10)
    ens = CENEnsemble({"a": head}, dense=True, detach=True)
    assert ens.modality_logits({"a": maps}, size=(12, 10))["a"].shape == (2, 3, 12, 10)


def test_cen_ensemble_of_present_modalities_without_detaching_and_in_low_precision():
    torch.manual_seed(0)
    ens = CENEnsemble({m: nn.Linear(4, 3) for m in ("a", "b", "c")}, dense=False, detach=False)
    with torch.no_grad():
        ens.alpha.copy_(torch.tensor([0.3, -1.0, 2.0]))
    xs = {m: torch.randn(5, 4) for m in ("a", "c")}  # b is missing
    logits = ens.modality_logits(xs)
    assert list(logits) == ["a", "c"]
    e = torch.tensor([0.3, 2.0]).exp()
    mixed = ens.combine(logits)
    torch.testing.assert_close(mixed, (e[0] * logits["a"] + e[1] * logits["c"]) / e.sum())
    mixed.sum().backward()
    assert ens.heads["a"].weight.grad.abs().sum() > 0 and ens.heads["b"].weight.grad is None  # not detached
    low = {m: v.detach().to(torch.bfloat16) for m, v in logits.items()}
    assert ens.combine(low).dtype == torch.bfloat16  # the weights follow the logits' precision


def test_unequal_widths_every_channel_receives_the_mean_of_those_that_have_it():
    dims = {"a": 4, "b": 6, "c": 8}
    op = create_fusion("channel-exchange", dims=dims)
    with torch.no_grad():
        for m in dims:
            op.norms[m].weight.zero_()  # every channel of every modality is exchanged
            op.norms[m].bias.uniform_(-1, 1)
    xs = _maps(dims)
    out = op(xs)
    n = {m: _bn(xs[m], op.norms[m]) for m in dims}
    for k in range(8):
        have = {m for m, d in dims.items() if k < d}
        for m in have:
            others = sorted(have - {m})
            expected = torch.stack([n[o][:, k] for o in others]).mean(0) if others else n[m][:, k]
            torch.testing.assert_close(out[m][:, k], expected, rtol=1e-5, atol=1e-5, msg=f"{m} channel {k}")


def test_cen_passes_its_options_to_every_stage():
    from fuselab.models.cen import CENBlock, CENStem, SparseParallelNorm

    model = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8], blocks=2, threshold=0.5, proximal_l1=0.3)
    exchanges = [m for m in model.modules() if hasattr(m, "threshold")]
    assert len(exchanges) == 3 and all((e.threshold, e.proximal_l1) == (0.5, 0.3) for e in exchanges)
    off = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8], exchanging=False, proximal_l1=0.3)
    twins = [m for m in off.modules() if isinstance(m, SparseParallelNorm)]
    assert len(twins) == 2 and all(t.proximal_l1 == 0.3 for t in twins)
    stem = CENStem(["a", "b"], {"a": 3, "b": 3}, 4, shared=True, exchanging=True, threshold=0.02)
    block = CENBlock(["a", "b"], 4, 8, stride=2, shared=True, exchanging=True, threshold=0.02)
    assert stem.norm.proximal_l1 == 0.0 and block.norm1.proximal_l1 == 0.0  # off unless asked for
    for conv, shape, stride in ((stem.conv.conv, (4, 3, 3, 3), 1), (block.conv1.conv, (8, 4, 3, 3), 2),
                                (block.conv2.conv, (8, 8, 3, 3), 1)):
        assert conv.weight.shape == shape and conv.bias is None  # the batch norm after it has the shift
        assert (conv.padding, conv.stride) == ((1, 1), (stride, stride))
    assert block.project.conv.weight.shape == (8, 4, 1, 1) and block.project.conv.bias is None
    dense = cen(dims={"t1": 3, "t2": 3}, num_classes=2, widths=[4, 8], dense=True, dropout=0.25)
    assert all(dense.merge.heads[m].head.dropout.p == 0.25 for m in ("t1", "t2"))


def test_channel_exchange_options_are_checked_with_the_operator_named():
    for bad in (True, -1, "0.1"):
        with pytest.raises(ValueError, match=rf"^channel-exchange: threshold must be a number >= 0, got {re.escape(repr(bad))}$"):
            create_fusion("channel-exchange", dims={"a": 4, "b": 4}, threshold=bad)
        with pytest.raises(ValueError, match=rf"^channel-exchange: proximal_l1 must be a number >= 0 \(0 = off\), "
                                             rf"got {re.escape(repr(bad))}$"):
            create_fusion("channel-exchange", dims={"a": 4, "b": 4}, proximal_l1=bad)
    default = create_fusion("channel-exchange", dims={"a": 4, "b": 4})
    before = default.norms["a"].weight.detach().clone()
    default.proximal_step(10.0)  # no proximal step unless asked for: the scales stay at 1
    assert default.proximal_l1 == 0.0 and torch.equal(default.norms["a"].weight, before)
    zero = create_fusion("channel-exchange", dims={"a": 4, "b": 4}, threshold=0, proximal_l1=0)
    assert (zero.threshold, zero.proximal_l1) == (0.0, 0.0)  # allowed: nothing is exchanged, nothing is stepped
    assert not any(mask.any() for mask in zero.exchanged().values())
    just = create_fusion("channel-exchange", dims={"a": 3, "b": 5, "c": 3})  # width = number of modalities: fine
    assert just.parts == {"a": (0, 1), "b": (1, 3), "c": (2, 3)}
    with pytest.raises(ValueError, match=r"^channel-exchange: modality 'a' has 2 channels; each of the 3 modalities "
                                         r"owns a part of the channels, so every width must be >= 3$"):
        create_fusion("channel-exchange", dims={"b": 2, "a": 2, "c": 3})
