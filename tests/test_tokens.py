"""Token layers and operators: tokenizers, the transformer block, bottleneck / joint attention, cross-attention,
token exchange and cross-attention pooling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fuselab
from fuselab.layers import FeatureTokenizer, PatchTokenizer, SpectrogramTokenizer, TransformerBlock

TOKEN_OPS = ["bottleneck", "joint-attention", "cross-attention", "token-exchange", "cross-attention-pool"]


def _blocks(modalities="ab", depth=1, dim=8, heads=2, seed=0):
    torch.manual_seed(seed)
    return {m: [TransformerBlock(dim=dim, heads=heads, mlp_ratio=2.0) for _ in range(depth)] for m in modalities}


# --- layers -------------------------------------------------------------------------------------------


def test_tokenizer_shapes():
    assert PatchTokenizer(in_channels=3, dim=8, image_size=(32, 16), patch_size=8)(torch.randn(2, 3, 32, 16)).shape == (2, 8, 8)
    ast = SpectrogramTokenizer(dim=8, frames=36, bins=26, patch_size=16, stride=10)
    assert ast.num_tokens == 2 * 3 and ast(torch.randn(2, 36, 26)).shape == (2, 6, 8)
    with pytest.raises(ValueError, match="divisible by patch_size=8"):
        PatchTokenizer(in_channels=3, dim=8, image_size=(30, 16), patch_size=8)


def test_patch_and_spectrogram_tokens_are_the_patches_in_row_major_order():
    torch.manual_seed(0)
    tok = PatchTokenizer(in_channels=2, dim=3, image_size=(4, 6), patch_size=2)
    x = torch.randn(1, 2, 4, 6)
    out = tok(x)
    w, b = tok.proj.weight, tok.proj.bias
    for i in range(2):
        for j in range(3):  # token i * 3 + j is the patch at row block i, column block j
            patch = x[0, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            assert torch.allclose(out[0, i * 3 + j], (w * patch).sum((1, 2, 3)) + b, atol=1e-5)
    ast = SpectrogramTokenizer(dim=3, frames=5, bins=4, patch_size=2, stride=2)
    spec = torch.randn(1, 5, 4)  # (T, F)
    out = ast(spec)
    assert ast.num_tokens == 2 * 2 and out.shape == (1, 4, 3)
    w, b = ast.proj.weight, ast.proj.bias
    for f in range(2):  # frequency blocks are the rows, time blocks the columns (AST)
        for t in range(2):
            patch = spec[0, 2 * t : 2 * t + 2, 2 * f : 2 * f + 2].T  # (F, T) patch
            assert torch.allclose(out[0, f * 2 + t], (w[:, 0] * patch).sum((1, 2)) + b, atol=1e-5)
    assert torch.equal(ast(spec[:, None]), out)  # (B, 1, T, F) is accepted too


def test_feature_tokenizer_is_ft_transformer_and_groups_with_padding():
    tok = FeatureTokenizer(in_features=3, dim=4)
    x = torch.randn(2, 3)
    expected = x[:, :, None] * tok.weight[:, 0][None] + tok.bias[None]  # token j = x_j W_j + b_j
    assert torch.allclose(tok(x), expected, atol=1e-6)
    grouped = FeatureTokenizer(in_features=5, dim=4, features_per_token=2)
    assert grouped.num_tokens == 3
    out = grouped(x5 := torch.randn(2, 5))
    last = x5[:, 4:5] @ grouped.weight[2, :1] + grouped.bias[2]  # the padded feature contributes nothing
    assert torch.allclose(out[:, 2], last, atol=1e-6)


def test_heads_keep_the_parameter_count_and_change_the_output():
    torch.manual_seed(0)
    one = TransformerBlock(dim=16, heads=1)
    eight = TransformerBlock(dim=16, heads=8)
    eight.load_state_dict(one.state_dict())
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in eight.parameters())
    x = torch.randn(2, 5, 16)
    assert not torch.allclose(one(x), eight(x), atol=1e-4)


def test_block_project_finish_is_the_block():
    (block,) = _blocks("a")["a"]
    x = torch.randn(2, 5, 8)
    assert torch.allclose(block.finish(x, *block.project(x)), block(x), atol=1e-6)


def test_drop_path_drops_whole_examples_in_training_only():
    torch.manual_seed(0)
    block = TransformerBlock(dim=8, heads=2, drop_path=0.5)
    x = torch.randn(64, 3, 8)
    block.eval()
    assert torch.equal(block(x), block(x))
    block.train()
    assert not torch.equal(block(x), block(x))


# --- registry facts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOKEN_OPS)
def test_fusion_info_is_filled(name):
    info = fuselab.fusion_info(name)
    assert "tokens" in info.forms
    for field in ("multimodal_rule", "natural_out_dim", "paper", "reference", "formula"):
        assert getattr(info, field), f"{name}: {field} is empty"
    assert info.kind == {"bottleneck": "wrapping", "joint-attention": "wrapping", "cross-attention-pool": "merge"}.get(
        name, "standalone"
    )


# --- bottleneck and joint attention -------------------------------------------------------------------


def _reference_block(block: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The pre-norm block written out: LN, per-head softmax(QK^T / sqrt(e)) V, out proj, residual, GELU MLP."""
    a, heads = block.attn, block.heads
    y = F.layer_norm(x, (x.shape[-1],), block.norm1.weight, block.norm1.bias)
    q, k, v = (y @ p.weight.T + p.bias for p in (a.q_proj, a.k_proj, a.v_proj))
    e = x.shape[-1] // heads
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * e : (h + 1) * e] for t in (q, k, v))
        weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(e), dim=-1)
        outs.append(weights @ vh)
    x = x + torch.cat(outs, -1) @ a.out_proj.weight.T + a.out_proj.bias
    y = F.layer_norm(x, (x.shape[-1],), block.norm2.weight, block.norm2.bias)
    hidden = F.gelu(y @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    return x + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def _bottleneck_by_hand(layers, z0, x):
    """MBT's update written out for any modalities present in ``x``: each block runs on [x_m, z]; the
    modality keeps its part; the next z is the plain mean of every present modality's copy."""
    depth = len(next(iter(layers.values())))
    z = z0.expand(next(iter(x.values())).shape[0], -1, -1)
    x = dict(x)
    for i in range(depth):
        copies = []
        for m in sorted(x):
            n = x[m].shape[1]
            y = _reference_block(layers[m][i], torch.cat([x[m], z], 1))
            x[m] = y[:, :n]
            copies.append(y[:, n:])
        z = sum(copies) / len(copies)
    return x


def _joint_by_hand(layers, x):
    """Joint attention written out: per block, every modality's queries over the keys and values of all."""
    depth = len(next(iter(layers.values())))
    x = dict(x)
    for i in range(depth):
        qkv = {m: layers[m][i].project(x[m]) for m in x}
        k = torch.cat([qkv[m][1] for m in x], 2)
        v = torch.cat([qkv[m][2] for m in x], 2)
        x = {m: layers[m][i].finish(x[m], qkv[m][0], k, v) for m in x}
    return x


def test_bottleneck_layers_equal_a_hand_written_reference():
    layers = _blocks(depth=2)
    op = fuselab.create_fusion("bottleneck", layers=layers, n_bottlenecks=2).eval()
    assert op.bottleneck.shape == (1, 2, 8) and op.bottleneck.std() < 0.1  # N(0, 0.02)
    x = {"a": torch.randn(2, 3, 8), "b": torch.randn(2, 5, 8)}
    z = op.bottleneck.expand(2, -1, -1)
    xa, xb = x["a"], x["b"]
    for i in range(2):
        ya = _reference_block(layers["a"][i], torch.cat([xa, z], 1))
        yb = _reference_block(layers["b"][i], torch.cat([xb, z], 1))
        xa, xb = ya[:, :3], yb[:, :5]
        z = (ya[:, 3:] + yb[:, 5:]) / 2
    out = op(x)
    assert torch.allclose(out["a"], xa, atol=1e-5) and torch.allclose(out["b"], xb, atol=1e-5)


def test_bottleneck_averages_all_three_copies_and_leaves_a_missing_one_out():
    # three blocks deep, so the second and third blocks read a z averaged over every modality's copy
    layers = _blocks("abc", depth=3)
    op = fuselab.create_fusion("bottleneck", layers=layers, n_bottlenecks=3).eval()
    with torch.no_grad():
        op.bottleneck.normal_()  # a larger z than N(0, 0.02), so a wrong average shows in the outputs
    x = {m: torch.randn(2, n, 8) for m, n in zip("abc", (3, 4, 5))}
    out, expected = op(x), _bottleneck_by_hand(layers, op.bottleneck, x)
    for m in "abc":
        assert out[m].shape == x[m].shape
        assert torch.allclose(out[m], expected[m], atol=1e-5), m
    # the mean of only two of the three copies (or their sum) is far from this
    two_of_three = _bottleneck_by_hand({m: layers[m] for m in "ab"}, op.bottleneck, {m: x[m] for m in "ab"})
    assert not torch.allclose(out["a"], two_of_three["a"], atol=1e-3)
    partial = op({"c": x["c"], "a": x["a"]})  # b absent: the mean runs over a's and c's copies only
    assert set(partial) == {"a", "c"}
    hand = _bottleneck_by_hand(layers, op.bottleneck, {"a": x["a"], "c": x["c"]})
    assert torch.allclose(partial["a"], hand["a"], atol=1e-5) and torch.allclose(partial["c"], hand["c"], atol=1e-5)
    assert not torch.allclose(partial["a"], out["a"], atol=1e-3)  # b's absence changed what a received


def test_joint_attention_uses_the_keys_and_values_of_all_three_modalities():
    layers = _blocks("abc", depth=2)
    op = fuselab.create_fusion("joint-attention", layers=layers).eval()
    x = {m: torch.randn(2, n, 8) for m, n in zip("abc", (3, 4, 5))}
    out, expected = op(x), _joint_by_hand(layers, x)
    for m in "abc":
        assert out[m].shape == x[m].shape
        assert torch.allclose(out[m], expected[m], atol=1e-5), m
    without_c = _joint_by_hand(layers, {m: x[m] for m in "ab"})
    assert not torch.allclose(out["a"], without_c["a"], atol=1e-3)  # c's keys matter to a
    partial = op({"a": x["a"], "c": x["c"]})
    hand = _joint_by_hand(layers, {"a": x["a"], "c": x["c"]})
    assert set(partial) == {"a", "c"}
    assert torch.allclose(partial["a"], hand["a"], atol=1e-5) and torch.allclose(partial["c"], hand["c"], atol=1e-5)


def _flows(op, x) -> dict[tuple[str, str], bool]:
    """For every ordered pair (source, target) of modalities: does the target's output depend on the
    source's input (a non-zero gradient)?"""
    x = {m: t.clone().requires_grad_(True) for m, t in x.items()}
    out = op(x)
    flows = {}
    for t in x:
        grads = torch.autograd.grad((out[t] * torch.randn_like(out[t])).sum(), list(x.values()),
                                    retain_graph=True, allow_unused=True)
        for s, g in zip(x, grads):
            if s != t:
                flows[(s, t)] = g is not None and bool(g.abs().sum() > 0)
    return flows


@pytest.mark.parametrize("modalities", ["ab", "abc"])
@pytest.mark.parametrize("name", ["bottleneck", "joint-attention"])
def test_wrapping_exchanges_carry_information_in_every_direction(name, modalities):
    torch.manual_seed(3)
    x = {m: torch.randn(2, 3 + i, 8) for i, m in enumerate(modalities)}
    one = fuselab.create_fusion(name, layers=_blocks(modalities, depth=1)).eval()
    two = fuselab.create_fusion(name, layers=_blocks(modalities, depth=2)).eval()
    pairs = {(s, t) for s in modalities for t in modalities if s != t}
    # two wrapped blocks: every modality reaches every other, both ways
    assert _flows(two, x) == {p: True for p in pairs}
    # one wrapped block: joint attention already mixes; the bottleneck's first block reads the learned z only
    assert _flows(one, x) == {p: name == "joint-attention" for p in pairs}


def test_bottleneck_rejects_unequal_widths_and_bad_counts():
    layers = {"a": [TransformerBlock(dim=8, heads=2)], "b": [TransformerBlock(dim=4, heads=2)]}
    with pytest.raises(ValueError, match="same token width"):
        fuselab.create_fusion("bottleneck", layers=layers)
    with pytest.raises(ValueError, match="n_bottlenecks must be a positive integer"):
        fuselab.create_fusion("bottleneck", layers=_blocks(), n_bottlenecks=0)


# --- standalone exchanges and the pooling merge -------------------------------------------------------


def test_cross_attention_keys_come_from_the_other_modalities_only():
    torch.manual_seed(0)
    op = fuselab.create_fusion("cross-attention", dims={"a": 8, "b": 4, "c": 8}, heads=2)
    x = {m: torch.randn(2, n, op.dims[m], requires_grad=True) for m, n in zip("abc", (3, 6, 2))}
    out = op(x)
    assert {m: t.shape for m, t in out.items()} == {m: t.shape for m, t in x.items()}
    ga, gb = torch.autograd.grad(out["a"].sum(), [x["a"], x["b"]])
    assert gb.abs().sum() > 0
    # a's own tokens enter only as queries and through the residual: with zero attention output, out = x
    torch.nn.init.zeros_(op.attn["a"].out_proj.weight)
    torch.nn.init.zeros_(op.attn["a"].out_proj.bias)
    assert torch.equal(op(x)["a"], x["a"])


def test_token_exchange_replaces_low_score_tokens_and_has_an_l1_term():
    torch.manual_seed(0)
    x = {"a": torch.randn(2, 5, 8), "b": torch.randn(2, 5, 8), "c": torch.randn(2, 5, 8)}
    keep_all = fuselab.create_fusion("token-exchange", dims={m: 8 for m in x}, threshold=0.0)
    assert all(torch.allclose(keep_all(x)[m], x[m]) for m in x)
    swap_all = fuselab.create_fusion("token-exchange", dims={m: 8 for m in x}, threshold=0.999)
    out = swap_all(x)
    assert torch.allclose(out["a"], (x["b"] + x["c"]) / 2, atol=1e-6)
    aux = swap_all.aux_losses()
    assert set(aux) == {"l1"} and 0 < aux["l1"] < 1
    (out["a"].sum() + aux["l1"]).backward()
    assert swap_all.score["a"].net[1].weight.grad.abs().sum() > 0  # the scorer learns


def test_token_exchange_needs_aligned_tokens():
    op = fuselab.create_fusion("token-exchange", dims={"a": 4, "b": 4})
    with pytest.raises(ValueError, match=r"modality 'b' has shape \(2, 3, 4\) but 'a' has \(2, 5, 4\); the token count must match"):
        op({"a": torch.randn(2, 5, 4), "b": torch.randn(2, 3, 4)})
    with pytest.raises(ValueError, match="same width"):
        fuselab.create_fusion("token-exchange", dims={"a": 4, "b": 6})


def test_cross_attention_pool_pools_tokens_of_unequal_counts_to_a_vector():
    torch.manual_seed(0)
    op = fuselab.create_fusion("cross-attention-pool", dims={"a": 6, "b": 8}, heads=2)
    assert op.width == 8 and op.out_dim == 16
    x = {"a": torch.randn(3, 4, 6), "b": torch.randn(3, 7, 8)}
    z = op(x)
    assert z.shape == (3, 16)
    assert torch.allclose(z, op(dict(reversed(list(x.items())))), atol=1e-6)


@pytest.mark.parametrize(
    "build",
    [
        lambda: fuselab.create_fusion("cross-attention", dims={"a": 6, "b": 6}, heads=4),
        lambda: fuselab.create_fusion("cross-attention-pool", dims={"a": 6, "b": 6}, width=6, heads=4),
    ],
)
def test_heads_must_divide_the_width(build):
    with pytest.raises(ValueError, match=r"heads=4 must divide the width of '\w+' \(6\)"):
        build()


def test_token_exchange_keeps_a_token_whose_score_equals_the_threshold():
    x = {m: torch.randn(2, 4, 6) for m in "abc"}
    for threshold, kept in ((0.5, True), (0.5 + 1e-6, False)):
        op = fuselab.create_fusion("token-exchange", dims={m: 6 for m in x}, threshold=threshold)
        for m in x:  # a scorer with a zero last layer scores exactly softmax([0, 0])[0] = 0.5
            torch.nn.init.zeros_(op.score[m].net[-1].weight)
            torch.nn.init.zeros_(op.score[m].net[-1].bias)
        out = op(x)
        for m in x:
            others = sum(x[k] for k in x if k != m) / 2
            assert torch.equal(op._scores[m], torch.full((2, 4), 0.5))
            assert torch.allclose(out[m], x[m] if kept else others, atol=1e-6), (threshold, m)


def test_token_exchange_scores_pass_the_task_gradient_straight_through():
    torch.manual_seed(0)
    op = fuselab.create_fusion("token-exchange", dims={"a": 4, "b": 4}, threshold=0.3)
    x = {m: torch.randn(2, 3, 4) for m in "ab"}
    out = op(x)
    s = op._scores["a"]
    (grad,) = torch.autograd.grad(out["a"].sum(), s)
    assert torch.allclose(grad, x["a"].sum(-1))  # d out / d s = x (per token, summed over the width)
    assert op.score["a"].net[1].out_features == 2 and op.score["a"].net[-1].out_features == 2  # LN, 4 -> 2 -> 2


@pytest.mark.parametrize("threshold,ok", [(0.0, True), (0.99, True), (1.0, False), (-0.01, False)])
def test_token_exchange_threshold_range(threshold, ok):
    if ok:
        assert fuselab.create_fusion("token-exchange", dims={"a": 4, "b": 4}, threshold=threshold).threshold == threshold
    else:
        with pytest.raises(ValueError, match=rf"^token-exchange: threshold must be in \[0, 1\), got {threshold}$"):
            fuselab.create_fusion("token-exchange", dims={"a": 4, "b": 4}, threshold=threshold)


def test_cross_attention_projects_other_widths_then_layer_norms_the_context():
    torch.manual_seed(0)
    op = fuselab.create_fusion("cross-attention", dims={"a": 8, "b": 4}, heads=2).eval()
    assert isinstance(op.proj["b_to_a"][0], fuselab.fusion.base.ChannelLinear) and op.proj["b_to_a"][0].in_features == 4
    assert isinstance(op.proj["a_to_b"][0], fuselab.fusion.base.ChannelLinear) and op.proj["a_to_b"][0].out_features == 4
    x = {"a": torch.randn(2, 3, 8), "b": torch.randn(2, 5, 4)}
    lin = op.proj["b_to_a"][0]
    ctx = F.layer_norm(x["b"] @ lin.weight.T + lin.bias, (8,))  # fresh LayerNorm: unit scale, zero shift
    q = F.layer_norm(x["a"], (8,))
    assert torch.allclose(op(x)["a"], x["a"] + op.attn["a"](q, ctx, ctx), atol=1e-5)
    assert op.attn["a"].heads == 2 and op.attn["b"].dim == 4


def test_cross_attention_pool_width_queries_and_output():
    torch.manual_seed(0)
    op = fuselab.create_fusion("cross-attention-pool", dims={"a": 7, "b": 5}, heads=3)
    assert op.width == 9  # the largest width rounded up to a multiple of the heads
    assert op.queries.shape == (2, 9) and op.queries.std() < 0.1  # one learned query per modality, N(0, 0.02)
    assert op.out_dim == 18 and isinstance(op.out, torch.nn.Identity)
    x = {"a": torch.randn(2, 4, 7), "b": torch.randn(2, 6, 5)}
    tokens = torch.cat([op.proj["a"](x["a"]), op.proj["b"](x["b"])], 1)
    q = op.queries.expand(2, -1, -1)
    assert torch.allclose(op(x), op.attn(q, tokens, tokens).flatten(1), atol=1e-6)
    v = {"a": torch.randn(2, 7), "b": torch.randn(2, 5)}  # a vector input is one token
    tokens = torch.cat([op.proj["a"](v["a"][:, None]), op.proj["b"](v["b"][:, None])], 1)
    assert torch.allclose(op(v), op.attn(q, tokens, tokens).flatten(1), atol=1e-6)
    with_out = fuselab.create_fusion("cross-attention-pool", dims={"a": 7, "b": 5}, out_dim=3, heads=3)
    assert with_out.out_dim == 3 and with_out.out.in_features == 18
    assert torch.allclose(with_out(x), with_out.out(with_out.attn(
        with_out.queries.expand(2, -1, -1), *[torch.cat([with_out.proj[m](x[m]) for m in "ab"], 1)] * 2).flatten(1)),
        atol=1e-6)
    with pytest.raises(ValueError, match="heads must be a positive integer"):
        fuselab.create_fusion("cross-attention-pool", dims={"a": 7, "b": 5}, heads=0)
    with pytest.raises(ValueError, match="heads must be a positive integer"):
        fuselab.create_fusion("cross-attention", dims={"a": 8, "b": 8}, heads=True)


def test_token_operator_defaults_and_option_checks():
    op = fuselab.create_fusion("cross-attention", dims={"a": 8, "b": 8}, dropout=0.25)
    assert op.heads == 4 and all(a.heads == 4 and a.dropout == 0.25 for a in op.attn.values())
    assert all(isinstance(p[0], torch.nn.Identity) for p in op.proj.values())  # equal widths: no projection
    pool = fuselab.create_fusion("cross-attention-pool", dims={"a": 8, "b": 8})
    assert pool.attn.heads == 4 and all(isinstance(p[0], torch.nn.Identity) for p in pool.proj.values())
    for heads in (0, -2, "2", 2.0):
        with pytest.raises(ValueError, match=rf"^cross-attention: heads must be a positive integer, got {heads!r}$"):
            fuselab.create_fusion("cross-attention", dims={"a": 8, "b": 8}, heads=heads)
        with pytest.raises(ValueError, match=rf"^cross-attention-pool: heads must be a positive integer, got {heads!r}$"):
            fuselab.create_fusion("cross-attention-pool", dims={"a": 8, "b": 8}, heads=heads)
    with pytest.raises(ValueError, match=r"^cross-attention: heads=3 must divide the width of 'b' \(8\)$"):
        fuselab.create_fusion("cross-attention", dims={"a": 6, "b": 8}, heads=3)
    with pytest.raises(ValueError, match=r"^cross-attention-pool: heads=4 must divide the width of 'width' \(6\)$"):
        fuselab.create_fusion("cross-attention-pool", dims={"a": 6, "b": 6}, width=6, heads=4)
    with pytest.raises(ValueError, match=r"out_dim must be a positive integer or None, got 0"):
        fuselab.create_fusion("cross-attention-pool", dims={"a": 8, "b": 8}, out_dim=0)
    # the token scorer: LN -> Linear(d, max(d // 2, 1)) -> GELU -> Linear(2)
    for width, hidden in ((2, 1), (3, 1), (8, 4)):
        tex = fuselab.create_fusion("token-exchange", dims={"a": width, "b": width})
        assert tex.score["a"].net[1].out_features == hidden
    assert tex.aux_losses() == {}  # nothing before a forward pass


def _score_by_hand(scorer, x):
    ln, fc1, _, fc2 = scorer.net
    h = F.gelu(F.linear(F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias), fc1.weight, fc1.bias))
    return torch.softmax(F.linear(h, fc2.weight, fc2.bias), -1)[..., 0]  # the first of two entries


def test_token_scores_and_pooling_by_hand():
    torch.manual_seed(0)
    tex = fuselab.create_fusion("token-exchange", dims={"a": 6, "b": 6}, threshold=0.45)
    for p in tex.parameters():
        torch.nn.init.normal_(p)
    x = {m: torch.randn(2, 5, 6) for m in "ab"}
    with torch.no_grad():
        tex.threshold = float(_score_by_hand(tex.score["a"], x["a"]).median())  # a keeps some tokens, not all
    out = tex(x)
    for m, other in (("a", "b"), ("b", "a")):
        s = _score_by_hand(tex.score[m], x[m])
        assert torch.allclose(tex._scores[m], s, atol=1e-6)
        assert torch.allclose(out[m], torch.where((s >= tex.threshold)[..., None], x[m], x[other]), atol=1e-6)
    kept = _score_by_hand(tex.score["a"], x["a"]) >= tex.threshold
    assert 0 < int(kept.sum()) < kept.numel()
    pool = fuselab.create_fusion("cross-attention-pool", dims={"a": 8, "b": 5}, heads=2)
    for p in pool.parameters():
        torch.nn.init.normal_(p)
    x = {"a": torch.randn(2, 3, 8), "b": torch.randn(2, 4, 5)}
    lin = pool.proj["b"][0]
    tokens = torch.cat([F.layer_norm(x["a"], (8,), pool.proj["a"][1].weight, pool.proj["a"][1].bias),
                        F.layer_norm(F.linear(x["b"], lin.weight, lin.bias), (8,), pool.proj["b"][1].weight,
                                     pool.proj["b"][1].bias)], 1)
    q = pool.queries.expand(2, -1, -1)
    assert torch.allclose(pool(x), pool.attn(q, tokens, tokens).flatten(1), atol=1e-5)


def test_bottleneck_leaves_a_dropped_samples_copy_out_of_its_mean():
    layers = _blocks("abc", depth=3)
    op = fuselab.create_fusion("bottleneck", layers=layers, n_bottlenecks=2).eval()
    with torch.no_grad():
        op.bottleneck.normal_()
    x = {m: torch.randn(4, n, 8) for m, n in zip("abc", (3, 5, 6))}  # batch 4: not a token count, not M
    masks = {"b": torch.tensor([1.0, 0.0, 1.0, 0.0]), "c": torch.tensor([1.0, 1.0, 0.0, 0.0])}
    full = _bottleneck_by_hand(layers, op.bottleneck, x)
    without_b = _bottleneck_by_hand(layers, op.bottleneck, {m: x[m] for m in "ac"})
    without_c = _bottleneck_by_hand(layers, op.bottleneck, {m: x[m] for m in "ab"})
    only_a = _bottleneck_by_hand(layers, op.bottleneck, {"a": x["a"]})
    for keep in (masks, {**masks, "a": torch.ones(4)}):  # a unnamed (kept), or named with ones
        out = op(x, keep=keep)
        assert all(torch.allclose(out[m][0], full[m][0], atol=1e-5) for m in "abc")  # sample 0 keeps all three
        assert all(torch.allclose(out[m][1], without_b[m][1], atol=1e-5) for m in "ac")  # sample 1: b dropped
        assert all(torch.allclose(out[m][2], without_c[m][2], atol=1e-5) for m in "ab")  # sample 2: c dropped
        assert torch.allclose(out["a"][3], only_a["a"][3], atol=1e-5)  # sample 3: a's copy alone
    all_kept = op(x, keep={"b": torch.ones(4)})
    assert all(torch.allclose(all_kept[m], full[m], atol=1e-5) for m in "abc")
    assert all(torch.allclose(op(x, keep={"z": torch.zeros(4)})[m], full[m], atol=1e-5) for m in "abc")


def _share_to_tail_by_hand(layer, joined, n):
    q, k, _ = layer.project(joined)
    attn = torch.softmax(q[:, :, :n] @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
    return float(attn[..., n:].sum(-1).mean())


def test_fusion_stats_are_the_attention_shares_by_hand():
    layers = _blocks("ab", depth=3)
    op = fuselab.create_fusion("bottleneck", layers=layers, n_bottlenecks=3).eval()  # 3 tokens, 2 heads
    x = {"a": torch.randn(2, 3, 8), "b": torch.randn(2, 5, 8)}
    z = op.bottleneck.expand(2, -1, -1)
    xs, shares = dict(x), []
    with torch.no_grad():
        for i in range(3):
            copies, block = [], []
            for m in "ab":
                joined = torch.cat([xs[m], z], 1)
                block.append(_share_to_tail_by_hand(layers[m][i], joined, xs[m].shape[1]))
                y = layers[m][i](joined)
                xs[m], copies = y[:, : xs[m].shape[1]], copies + [y[:, xs[m].shape[1]:]]
            shares.append(block)
            z = sum(copies) / 2
    stats = op.fusion_stats(x)
    assert stats["initial_attention"] == pytest.approx(sum(shares[0]) / 2, rel=1e-5)
    assert stats["cross_attention"] == pytest.approx(sum(shares[1] + shares[2]) / 4, rel=1e-5)
    one = fuselab.create_fusion("bottleneck", layers=_blocks("ab", depth=1)).eval()
    assert one.fusion_stats(x)["cross_attention"] == 0.0  # one block: the bottleneck carries nothing

    joint = fuselab.create_fusion("joint-attention", layers=layers).eval()
    xs, expected = dict(x), []
    with torch.no_grad():
        for i in range(3):
            qkv = {m: layers[m][i].project(xs[m]) for m in "ab"}
            k = torch.cat([qkv[m][1] for m in "ab"], 2)
            v = torch.cat([qkv[m][2] for m in "ab"], 2)
            start = 0
            for m in "ab":
                q = qkv[m][0]
                attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
                n = q.shape[2]
                expected.append(float((1 - attn[..., start : start + n].sum(-1)).mean()))
                start += n
            xs = {m: layers[m][i].finish(xs[m], qkv[m][0], k, v) for m in "ab"}
    assert joint.fusion_stats(x)["cross_attention"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_joint_attention_needs_transformer_blocks_with_equal_heads():
    class ProjectOnly(torch.nn.Module):
        dim, heads = 8, 2

        def project(self, x):
            return x

    with pytest.raises(ValueError, match=r"^joint-attention: layers need project\(\) and finish\(\) "
                                         r"\(fuselab.layers.TransformerBlock\); 'b' has a ProjectOnly$"):
        fuselab.create_fusion("joint-attention", layers={"a": [TransformerBlock(dim=8, heads=2)], "b": [ProjectOnly()]})
    layers = {"a": [TransformerBlock(dim=8, heads=2)], "b": [TransformerBlock(dim=8, heads=4)]}
    with pytest.raises(ValueError, match=r"^joint-attention: every modality needs the same number of heads, "
                                         r"got \{'a': 2, 'b': 4\}$"):
        fuselab.create_fusion("joint-attention", layers=layers)


def test_token_exchange_names_a_threshold_that_never_replaces_a_token():
    from fuselab.fusion.tokens import TokenExchange

    assert TokenExchange.fusion_problem({"threshold": 0}) == (
        "exchange.threshold=0 never replaces a token (a score is never below it), so token-exchange carries nothing "
        "between modalities; use a threshold above 0 (TokenFusion: 0.02)")
    assert TokenExchange.fusion_problem({"threshold": -0.5}).startswith("exchange.threshold=-0.5 never replaces")
    for options in ({}, {"threshold": 0.02}, {"threshold": 0.5}, {"threshold": 1e-9}, {"threshold": "${t}"}):
        assert TokenExchange.fusion_problem(options) is None, options


def test_bottleneck_options_and_layer_checks():
    op = fuselab.create_fusion("bottleneck", layers=_blocks())
    assert op.n_bottlenecks == 4 and op.bottleneck.shape == (1, 4, 8)  # the default
    assert fuselab.create_fusion("bottleneck", layers=_blocks(), n_bottlenecks=1).n_bottlenecks == 1
    for bad in (0, -1, True, "2", 2.0):
        with pytest.raises(ValueError, match=rf"^bottleneck: n_bottlenecks must be a positive integer, got {bad!r}$"):
            fuselab.create_fusion("bottleneck", layers=_blocks(), n_bottlenecks=bad)
    with pytest.raises(ValueError, match=r"^Bottleneck: layers must expose their token width as .dim "
                                         r"\(fuselab.layers.TransformerBlock\); 'b' has a Linear$"):
        fuselab.create_fusion("bottleneck", layers={"a": [TransformerBlock(dim=8, heads=2)], "b": [torch.nn.Linear(8, 8)]})
    mixed = {"a": [TransformerBlock(dim=8, heads=2), TransformerBlock(dim=4, heads=2)],
             "b": [TransformerBlock(dim=8, heads=2), TransformerBlock(dim=8, heads=2)]}
    with pytest.raises(ValueError, match=r"^JointAttention: the layers of 'a' have different widths$"):
        fuselab.create_fusion("joint-attention", layers=mixed)
