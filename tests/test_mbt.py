"""The ``mbt`` builder: information flow between streams, heads, options, config and a real run on mfeat."""

from __future__ import annotations

import pytest
import torch

from fuselab.layers import TransformerBlock
from fuselab.models.mbt import mbt
from fuselab.train.config import ConfigError, make_config
from fuselab.train.run import build_data, build_model, execute

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


def _logit_flows(model, dims) -> dict[tuple[str, str], bool]:
    """For every ordered pair (source, target): do the target stream's logits depend on the source's input?"""
    g = torch.Generator().manual_seed(2)
    x = {m: torch.randn(3, d, generator=g, requires_grad=True) for m, d in dims.items()}
    logits = model(x).modality_logits
    flows = {}
    for t in dims:
        grads = torch.autograd.grad(logits[t].sum(), list(x.values()), retain_graph=True, allow_unused=True)
        for s, grad in zip(dims, grads):
            if s != t:
                flows[(s, t)] = grad is not None and bool(grad.abs().sum() > 0)
    return flows


@pytest.mark.parametrize("dims", [{"a": 12, "b": 9}, {"a": 12, "b": 9, "c": 6}])
@pytest.mark.parametrize("exchange", ["bottleneck", "joint-attention"])
def test_exchange_carries_information_both_ways_with_two_and_three_modalities(exchange, dims):
    pairs = {(s, t) for s in dims for t in dims if s != t}
    wrapped_two = _model(dims=dims, fusion_layer=2, exchange={"name": exchange})  # blocks 2 and 3 wrapped
    assert _logit_flows(wrapped_two, dims) == {p: True for p in pairs}
    # one wrapped block: the bottleneck's only update is never read, so nothing passes; joint attention mixes
    wrapped_one = _model(dims=dims, fusion_layer=3, exchange={"name": exchange})
    assert _logit_flows(wrapped_one, dims) == {p: exchange == "joint-attention" for p in pairs}


def test_class_token_pool_reads_the_class_token():
    model = _model(classifier="token")
    seen = {}
    model.pool["a"].register_forward_hook(lambda mod, inp, out: seen.update(tokens=inp[0], pooled=out))
    stem = model.encoders["a"][0]
    with torch.no_grad():
        stem.cls.token.normal_()
        tokens = stem(_x()["a"])
    # the stem puts the class token first (plus its position embedding), the same for every sample
    assert torch.allclose(tokens[:, 0], (stem.cls.token[0, 0] + stem.position.embedding[0, 0]).expand(3, -1))
    out = model(_x())
    norm = model.pool["a"][0]
    assert torch.equal(seen["pooled"], norm(seen["tokens"])[:, 0])  # token 0 of the normed stream, not the last
    assert not torch.allclose(seen["pooled"], norm(seen["tokens"])[:, -1])
    assert torch.allclose(out.modality_logits["a"], model.merge.heads["a"](seen["pooled"]), atol=1e-6)


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
    # shared weights: both streams run the very same blocks (and one final LayerNorm); tokenizers stay apart
    assert shared.encoders["a"][1] is shared.encoders["b"][1]
    assert shared.exchange.layers["a"][0] is shared.exchange.layers["b"][0]
    assert shared.pool["a"][0] is shared.pool["b"][0]
    assert shared.encoders["a"][0] is not shared.encoders["b"][0]
    # gap: the pooled vector is the mean of the normed tokens
    gap = _model(classifier="gap")
    seen = {}
    gap.pool["a"].register_forward_hook(lambda mod, inp, out: seen.update(tokens=inp[0], pooled=out))
    out = gap(x)
    assert gap.encoders["a"][0].num_tokens == 4  # 12 features, 3 per token, no class token
    assert torch.allclose(seen["pooled"], gap.pool["a"][0](seen["tokens"]).mean(1), atol=1e-6)
    assert torch.allclose(out.logits, (out.modality_logits["a"] + out.modality_logits["b"]) / 2, atol=1e-6)
    # concat: a linear head on the concatenated pooled vectors
    concat = _model(fusion={"name": "concat"})
    seen = {}
    concat.head.register_forward_hook(lambda mod, inp, out: seen.update(features=inp[0], logits=out))
    out = concat(x)
    assert seen["features"].shape == (3, 16) and torch.equal(out.logits, seen["logits"])
    # a standalone exchange runs before each of the wrapped blocks (blocks 2 and 3), and b reaches a's logits
    cross = _model(exchange={"name": "cross-attention", "heads": 2}, modality_heads=True)
    kinds = [type(step).__name__ for step in cross.exchange.steps]
    assert kinds == ["CrossAttention", "PerModality", "CrossAttention", "PerModality"]
    (grad,) = torch.autograd.grad(cross(x).modality_logits["a"].sum(), x["b"])
    assert grad.abs().sum() > 0
    # token-exchange: its L1 term reaches the model's auxiliary losses, as the mean score of both exchanges
    same_counts = {"a": 12, "b": 12}
    tex = _model(dims=same_counts, exchange={"name": "token-exchange"})
    out = tex({m: torch.randn(3, 12) for m in same_counts})
    l1 = {k: v for k, v in out.aux_losses.items() if k.endswith(".l1")}
    steps = [s for s in tex.exchange.steps if type(s).__name__ == "TokenExchange"]
    assert len(l1) == len(steps) == 2
    for step in steps:
        hand = torch.stack([s.abs().mean() for s in step._scores.values()]).mean()
        assert any(torch.equal(v, hand) for v in l1.values())
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
    # three blocks, fused from block 1: two wrapped blocks, so the second reads the bottleneck the first wrote
    # (with fusion_layer = layers - 1 the bottleneck update is never read and the run is late fusion)
    cfg = make_config(None, [
        "model.name=mbt", "model.width=32", "model.heads=4", "model.layers=3", "model.fusion_layer=1",
        "model.features_per_token=8", "fusion.name=late", "data.views=[fou,kar,zer]",
        "train.epochs=6", "train.batch_size=64", "train.lr=2e-3", "train.threads=1", "train.checkpoint=false",
    ])
    result = execute(cfg)
    assert result.metrics["test_accuracy"] > 0.8  # chance is 0.10
    # the trained bottleneck carries information: fou's logits change when the other views of the same
    # samples are swapped for those of other samples, while fou's own input stays
    data = build_data(cfg)
    model = build_model(cfg, data)
    model.load_state_dict(result.fit.state_dict)
    model.eval()
    x = data.test.x
    perm = torch.roll(torch.arange(len(data.test)), 1)
    swapped = {m: (t if m == "fou" else t[perm]) for m, t in x.items()}
    with torch.no_grad():
        clean, mixed = model(x).modality_logits["fou"], model(swapped).modality_logits["fou"]
    change = (clean - mixed).abs().mean() / clean.abs().mean()
    assert change > 0.01, f"fou's logits moved by {change:.4f} of their size: the bottleneck carried nothing"


def test_builder_hands_every_option_to_its_parts():
    model = mbt(dims={"img": (3, 8, 12), "aud": (26, 36), "vec": 10}, num_classes=5, fusion={"name": "concat"},
                layers=3, width=8, heads=2, mlp_ratio=2.0, fusion_layer=1, n_bottlenecks=3, tokenizer="auto",
                patch_size={"img": 4, "aud": 16}, patch_stride={"aud": 10}, dropout=0.25, attn_dropout=0.125,
                drop_path=0.5, modality_heads=True, features_per_token=4)
    stems = {m: model.encoders[m][0] for m in ("img", "aud", "vec")}
    assert type(stems["img"].tokenizer).__name__ == "PatchTokenizer" and stems["img"].tokenizer.patch_size == 4
    assert stems["img"].num_tokens == 1 + (8 // 4) * (12 // 4)  # class token + patches
    assert type(stems["aud"].tokenizer).__name__ == "SpectrogramTokenizer"
    assert stems["aud"].tokenizer.proj.kernel_size == (16, 16) and stems["aud"].tokenizer.proj.stride == (10, 10)
    assert stems["vec"].tokenizer.num_tokens == 3  # 10 features, 4 per token
    assert all(s.dropout.p == 0.25 for s in stems.values())
    blocks = [model.encoders["vec"][1], *model.exchange.layers["vec"]]
    assert len(model.encoders["vec"]) == 2 and len(blocks) == 3  # stem + fusion_layer blocks, then the rest
    assert [b.drop_path.p for b in blocks] == [0.0, 0.25, 0.5]  # grows linearly to drop_path
    assert all(b.mlp.fc1.out_features == 16 and b.attn.dropout == 0.125 and b.dropout.p == 0.25 for b in blocks)
    assert model.exchange.bottleneck.shape == (1, 3, 8)
    assert model.head[0].p == 0.25 and (model.head[1].in_features, model.head[1].out_features) == (24, 5)
    assert {m: (h.in_features, h.out_features) for m, h in model.modality_heads.items()} == {
        m: (8, 5) for m in ("aud", "img", "vec")}
    x = {"img": torch.randn(2, 3, 8, 12), "aud": torch.randn(2, 26, 36), "vec": torch.randn(2, 10)}
    out = model.eval()(x)
    assert out.logits.shape == (2, 5) and set(out.modality_logits) == {"aud", "img", "vec"}


def test_one_modality_is_a_unimodal_baseline_without_exchange_or_merge():
    model = _model(dims={"a": 12}, fusion={"name": "concat"}, exchange={"name": "joint-attention"}, fusion_layer=1)
    assert model.exchange is None and type(model.merge).__name__ == "SingleStream"
    assert len(model.encoders["a"]) == 1 + 4  # every block is the stream's own
    x = torch.randn(3, 12)
    out = model({"a": x})
    seen = model.pool["a"](model.encoders["a"](x))
    assert torch.allclose(out.logits, model.head(seen), atol=1e-6)
    late = _model(dims={"a": 12}, fusion={"name": "late"})
    assert late.head is not None and late.head[1].in_features == 8  # late needs a head of its own here


def test_per_modality_options_and_defaults():
    from fuselab.models.mbt import auto_tokenizer, make_tokenizer, per_modality

    assert per_modality(3, ["a", "b"], 16) == {"a": 3, "b": 3}
    assert per_modality({"a": 3, "z": 9}, ["a", "b"], 16) == {"a": 3, "b": 16}  # unnamed: default; extra: ignored
    assert [auto_tokenizer(s) for s in (10, (3, 8, 8), (20, 30))] == ["feature", "patch", "spectrogram"]
    model = mbt(dims={"a": (3, 16, 16), "b": (3, 32, 32)}, num_classes=2, fusion={"name": "late"}, layers=1,
                width=8, heads=2, fusion_layer=1, tokenizer={"a": "patch", "b": "patch"}, patch_size={"b": 8})
    # a is not named in patch_size: the default 16
    assert model.encoders["a"][0].tokenizer.patch_size == 16 and model.encoders["b"][0].tokenizer.patch_size == 8
    with pytest.raises(ValueError, match=r"^model.tokenizer=feature needs vector inputs"):  # b defaults to feature
        mbt(dims={"a": (3, 16, 16), "b": (3, 32, 32)}, num_classes=2, fusion={"name": "late"}, layers=1, fusion_layer=1,
            width=8, heads=2, tokenizer={"a": "patch"})
    with pytest.raises(ValueError, match=r"^model.tokenizer=feature needs vector inputs \(an integer width\), got shape"):
        make_tokenizer("feature", (3, 8, 8), width=8, features_per_token=1, patch_size=4, patch_stride=4)
    with pytest.raises(ValueError, match=r"^model.tokenizer=patch needs image inputs \(C, H, W\), got shape 10$"):
        make_tokenizer("patch", 10, width=8, features_per_token=1, patch_size=4, patch_stride=4)
    with pytest.raises(ValueError, match=r"^model.tokenizer=spectrogram needs \(frames, bins\) inputs, got shape"):
        make_tokenizer("spectrogram", (3, 8, 8), width=8, features_per_token=1, patch_size=4, patch_stride=4)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"layers": 0}, r"^model.layers must be a positive integer, got 0$"),
        ({"layers": True}, r"^model.layers must be a positive integer, got True$"),
        ({"heads": 0}, r"^model.heads=0 must be a positive divisor of model.width=8$"),
        ({"heads": True}, r"^model.heads=True must be a positive divisor"),
        ({"fusion_layer": True}, r"^model.fusion_layer must be in 0..4"),
        ({"dims": {}}, r"^mbt needs at least 1 modality, got none$"),
        ({"tokenizer": "pixel"}, r"^model.tokenizer must be one of feature, patch, spectrogram, auto, got 'pixel'$"),
    ],
)
def test_more_bad_options_fail_with_one_clear_line(options, message):
    with pytest.raises(ValueError, match=message):
        _model(**options)


def test_fusion_problem_names_a_bottleneck_that_spans_only_the_last_block():
    from fuselab.models.mbt import fusion_problem

    assert fusion_problem({"layers": 3, "fusion_layer": 2}, {"name": "bottleneck"}) == (
        "model.fusion_layer=2 with model.layers=3: the bottleneck then spans only the last block, whose bottleneck "
        "update no block reads, so nothing passes between modalities (late fusion plus learned tokens); use "
        "model.fusion_layer <= 1, or model.fusion_layer=3 for late fusion")
    # the builder's defaults (4 layers, fusion from block 2, the bottleneck) wrap two blocks: no problem
    assert fusion_problem({}, None) is None and fusion_problem({}, {}) is None
    assert fusion_problem({"layers": 3}, None).startswith("model.fusion_layer=2 with model.layers=3:")
    assert fusion_problem({"fusion_layer": 3}, None).startswith("model.fusion_layer=3 with model.layers=4:")
    assert fusion_problem({"fusion_layer": 3}, {"lr": 1}).startswith("model.fusion_layer=3 with model.layers=4:")
    for layers, fusion_layer in ((4, 2), (4, 4), (4, 0), (2, 0)):  # two or more wrapped blocks, or none at all
        assert fusion_problem({"layers": layers, "fusion_layer": fusion_layer}, None) is None
    for name in ("joint-attention", "cross-attention"):  # these mix inside the block itself
        assert fusion_problem({"layers": 3, "fusion_layer": 2}, {"name": name}) is None
    assert fusion_problem({"layers": "${x}", "fusion_layer": 2}, None) is None  # unresolved: the builder checks


def test_spectrogram_tokenizer_takes_patch_size_and_stride():
    from fuselab.models.mbt import make_tokenizer

    tok = make_tokenizer("spectrogram", (36, 26), width=8, features_per_token=1, patch_size=8, patch_stride=6)
    assert tok.proj.kernel_size == (8, 8) and tok.proj.stride == (6, 6)
    assert tok.num_tokens == ((26 - 8) // 6 + 1) * ((36 - 8) // 6 + 1)
