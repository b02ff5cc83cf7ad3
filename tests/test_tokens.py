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


def test_joint_attention_attends_over_every_modality_with_its_own_weights():
    layers = _blocks()
    op = fuselab.create_fusion("joint-attention", layers=layers).eval()
    x = {"a": torch.randn(2, 3, 8), "b": torch.randn(2, 4, 8)}
    out = op(x)
    (la,), (lb,) = layers["a"], layers["b"]
    qa, ka, va = la.project(x["a"])
    _, kb, vb = lb.project(x["b"])
    expected = la.finish(x["a"], qa, torch.cat([ka, kb], 2), torch.cat([va, vb], 2))
    assert torch.allclose(out["a"], expected, atol=1e-6)
    assert not torch.allclose(out["a"], la(x["a"]), atol=1e-4)  # it did see b


@pytest.mark.parametrize("name", ["bottleneck", "joint-attention"])
def test_wrapping_exchanges_take_three_modalities_and_a_missing_one(name):
    op = fuselab.create_fusion(name, layers=_blocks("abc", depth=2))
    x = {m: torch.randn(2, n, 8) for m, n in zip("abc", (3, 4, 5))}
    out = op(x)
    assert {m: t.shape for m, t in out.items()} == {m: x[m].shape for m in x}
    assert set(op({"a": x["a"], "c": x["c"]})) == {"a", "c"}


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
