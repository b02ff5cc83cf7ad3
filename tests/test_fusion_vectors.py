"""Registry-wide tests of the fusion operators on vectors and tokens, generated from ``fusion_info``."""

from __future__ import annotations

import pytest
import torch

import fuselab

SHAPES = {"vector": (), "tokens": (3,)}
WIDTHS = [5, 8, 6, 4, 7, 3]  # different widths, so every operator projects where it must
NAMES = ["audio", "video", "depth", "text", "imu", "gaze"]


def _merge_cases():
    for name in fuselab.list_fusions():
        info = fuselab.fusion_info(name)
        if info.contract != "merge":
            continue
        for form in info.forms:
            if form in SHAPES:
                yield name, form


CASES = list(_merge_cases())


def _inputs(n: int, form: str, batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {NAMES[i]: torch.randn(batch, *SHAPES[form], WIDTHS[i], generator=g) for i in range(n)}


def _build(name: str, n: int, out_dim: int | None = 7) -> torch.nn.Module:
    torch.manual_seed(0)
    dims = {NAMES[i]: WIDTHS[i] for i in range(n)}
    return fuselab.create_fusion(name, dims=dims, out_dim=out_dim)


@pytest.mark.parametrize("n", [2, 3, 6])
@pytest.mark.parametrize("name,form", CASES)
def test_shape_for_2_3_and_6_modalities(name, form, n):
    f = _build(name, n)
    z = f(_inputs(n, form))
    kept = () if getattr(f, "pools_tokens", False) else SHAPES[form]  # a pooling merge returns vectors
    assert z.shape == (4, *kept, 7)
    assert f.out_dim == 7
    assert torch.isfinite(z).all()
    # every modality reaches the output (a loop that skips one, e.g. the last, fails here)
    x = _inputs(n, form)
    for m in x:
        changed = f({k: (v + torch.randn_like(v) if k == m else v) for k, v in x.items()})
        assert not torch.allclose(changed, z, atol=1e-5), f"{name}: the output ignores modality '{m}'"
    # each sample's output depends on that sample only
    assert torch.allclose(f({k: v[:1] for k, v in x.items()}), z[:1], atol=1e-5)


@pytest.mark.parametrize("name", [n for n, form in CASES if form == "vector" and n != "late"])
def test_natural_width_is_the_declared_out_dim(name):
    f = _build(name, 3, out_dim=None)
    assert f(_inputs(3, "vector")).shape == (4, f.out_dim)


@pytest.mark.parametrize("name,form", CASES)
def test_every_parameter_gets_a_gradient_and_a_step_changes_the_output(name, form):
    f = _build(name, 3)
    x = _inputs(3, form)
    params = list(f.parameters())
    assert params, f"{name} has no parameters with differing widths"
    z = f(x)
    (z * torch.randn_like(z)).sum().backward()
    for pname, p in f.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {pname} got no gradient"
    before = z.detach().clone()
    torch.optim.SGD(params, lr=0.1).step()
    assert not torch.allclose(f(x), before), f"{name}: one optimiser step left the output unchanged"


@pytest.mark.parametrize("name,form", CASES)
def test_dict_order_does_not_matter(name, form):
    f = _build(name, 3)
    x = _inputs(3, form)
    reordered = dict(reversed(list(x.items())))
    assert torch.allclose(f(x), f(reordered), atol=1e-6)


def test_concat_and_sum_golden_values():
    x = {"b": torch.tensor([[3.0, 4.0]]), "a": torch.tensor([[1.0, 2.0]])}
    concat = fuselab.create_fusion("concat", dims={"a": 2, "b": 2})
    assert torch.equal(concat(x), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert torch.equal(fuselab.create_fusion("sum", dims={"a": 2, "b": 2})(x), torch.tensor([[4.0, 6.0]]))
    assert torch.equal(fuselab.create_fusion("product", dims={"a": 2, "b": 2})(x), torch.tensor([[3.0, 8.0]]))
    assert torch.equal(fuselab.create_fusion("max", dims={"a": 2, "b": 2})(x), torch.tensor([[3.0, 4.0]]))


@pytest.mark.parametrize(
    "name,expected",
    [("lmf", -4.5956984), ("tfn", -0.67534363), ("mfb", -0.52866137), ("gated", -2.6653037)],
)
def test_golden_value_under_a_fixed_seed(name, expected):
    f = _build(name, 2)
    z = f(_inputs(2, "vector"))
    assert z.sum().item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_lmf_factors_are_registered_parameters():
    f = fuselab.create_fusion("lmf", dims={"a": 4, "b": 5, "c": 6}, out_dim=8, rank=3)
    names = {n for n, _ in f.named_parameters()}
    assert {"factors.a", "factors.b", "factors.c", "mix", "bias"} <= names
    assert f.factors["a"].shape == (3, 5, 8)


def test_lmf_matches_its_formula_by_hand():
    torch.manual_seed(1)
    f = fuselab.create_fusion("lmf", dims={"a": 2, "b": 3}, out_dim=4, rank=2)
    x = {"a": torch.randn(1, 2), "b": torch.randn(1, 3)}
    one = torch.ones(1, 1)
    fa = torch.cat([x["a"], one], -1)
    fb = torch.cat([x["b"], one], -1)
    expected = f.bias.clone()
    for r in range(2):
        expected = expected + f.mix[r] * (fa @ f.factors["a"][r]) * (fb @ f.factors["b"][r])
    assert torch.allclose(f(x), expected, atol=1e-6)


def test_tfn_default_projection_keeps_six_modalities_tractable():
    f = _build("tfn", 6)
    assert (f.proj_dim + 1) ** 6 <= 4096 and f.proj_dim == 3


def test_film_modulates_the_target_only():
    f = fuselab.create_fusion("film", dims={"a": 3, "b": 2}, target="a")
    torch.nn.init.zeros_(f.film.weight)
    torch.nn.init.zeros_(f.film.bias)
    x = {"a": torch.randn(2, 3), "b": torch.randn(2, 2)}
    assert torch.equal(f(x), x["a"])  # zero modulation is the identity on the target


def test_late_averages_per_modality_heads():
    f = fuselab.create_fusion("late", dims={"a": 3, "b": 2}, out_dim=5)
    x = {"a": torch.randn(2, 3), "b": torch.randn(2, 2)}
    expected = (f.heads["a"](x["a"]) + f.heads["b"](x["b"])) / 2
    assert torch.allclose(f(x), expected)
    assert torch.allclose(f({"a": x["a"]}), f.heads["a"](x["a"]))  # a missing modality is left out
    assert f.produces_logits


def test_sum_without_a_modality_is_the_sum_of_the_others():
    f = fuselab.create_fusion("sum", dims={"a": 2, "b": 2, "c": 2})
    x = {m: torch.randn(3, 2) for m in "abc"}
    assert torch.allclose(f({"a": x["a"], "c": x["c"]}), x["a"] + x["c"])


# --- bad input: one ValueError a user can act on -------------------------------------------------


def test_missing_modality_key():
    f = fuselab.create_fusion("concat", dims={"a": 2, "b": 2})
    with pytest.raises(ValueError, match=r"missing modality 'b'; expected keys \['a', 'b'\]"):
        f({"a": torch.randn(1, 2)})


def test_unexpected_modality_key():
    f = fuselab.create_fusion("concat", dims={"a": 2, "b": 2})
    with pytest.raises(ValueError, match="unexpected modality 'c'"):
        f({"a": torch.randn(1, 2), "b": torch.randn(1, 2), "c": torch.randn(1, 2)})


def test_wrong_width_names_modality_expected_and_given():
    f = fuselab.create_fusion("gated", dims={"a": 2, "b": 3})
    with pytest.raises(ValueError, match=r"modality 'b' must have width 3 on axis 1, got shape \(1, 4\)"):
        f({"a": torch.randn(1, 2), "b": torch.randn(1, 4)})


def test_wrong_rank():
    f = fuselab.create_fusion("mlb", dims={"a": 2, "b": 2})
    with pytest.raises(ValueError, match=r"modality 'a' must be vector \(B, D\) or tokens \(B, N, D\), got shape"):
        f({"a": torch.randn(1, 2, 2, 2), "b": torch.randn(1, 2, 2, 2)})


def test_fewer_than_two_modalities():
    with pytest.raises(ValueError, match="needs at least 2 modalities, got 1"):
        fuselab.create_fusion("sum", dims={"a": 4})


def test_non_positive_width():
    with pytest.raises(ValueError, match="modality 'b' needs a positive integer width"):
        fuselab.create_fusion("sum", dims={"a": 4, "b": 0})


def test_late_requires_the_number_of_classes():
    with pytest.raises(ValueError, match="late: out_dim"):
        fuselab.create_fusion("late", dims={"a": 4, "b": 4})


def test_mismatched_batch():
    f = fuselab.create_fusion("sum", dims={"a": 2, "b": 2})
    with pytest.raises(ValueError, match="same form and batch size"):
        f({"a": torch.randn(2, 2), "b": torch.randn(3, 2)})


# --- options and their checks, operator by operator ------------------------------------------------


@pytest.mark.parametrize("name", [n for n, form in CASES if form == "vector"])
@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_every_merge_rejects_a_bad_out_dim(name, bad):
    with pytest.raises(ValueError, match=rf"out_dim must be a positive integer or None, got {bad!r}$"):
        fuselab.create_fusion(name, dims={"a": 3, "b": 4}, out_dim=bad)


def test_asymmetric_merges_follow_order_and_target():
    torch.manual_seed(0)
    x = {"a": torch.randn(2, 3), "b": torch.randn(2, 4), "c": torch.randn(2, 5)}
    film = fuselab.create_fusion("film", dims={"a": 3, "b": 4, "c": 5}, order=["b", "c", "a"])
    assert film.target == "b" and film.context == ["a", "c"] and film.out_dim == 4
    named = fuselab.create_fusion("film", dims={"a": 3, "b": 4, "c": 5}, target="c")
    assert named.target == "c" and named.context == ["a", "b"] and named(x).shape == (2, 5)
    with pytest.raises(ValueError, match=r"^film: target 'z' is not a modality; modalities are \['a', 'b', 'c'\]$"):
        fuselab.create_fusion("film", dims={"a": 3, "b": 4, "c": 5}, target="z")
    for name in ("film", "mi"):
        with pytest.raises(ValueError, match=rf"^{name}: order \['a'\] must list each modality exactly once; "
                                             r"modalities are \['a', 'b'\]$"):
            fuselab.create_fusion(name, dims={"a": 3, "b": 4}, order=["a"])
    mi = fuselab.create_fusion("mi", dims={"a": 3, "b": 4, "c": 5}, order=["c", "a", "b"])
    assert mi.input == "c" and mi.context == ["a", "b"] and mi.in_proj.in_features == 5


def _mi_by_hand(f, xs):
    ms = [f.input, *f.context]
    c = torch.cat([f.ctx_proj[m](xs[m]) for m in ms[1:]], -1)
    x = xs[ms[0]] @ f.in_proj.weight.T + f.in_proj.bias
    w = c @ f.weight_gen.weight.T + f.weight_gen.bias
    return w * x + c @ f.bias_gen.weight.T + f.bias_gen.bias  # vector: (o) * (o); scalar: (1) * (o)


@pytest.mark.parametrize("variant,gen", [("vector", 6), ("scalar", 1)])
def test_multiplicative_interaction_diagonal_and_scalar_variants_by_hand(variant, gen):
    torch.manual_seed(0)
    f = fuselab.create_fusion("mi", dims={"a": 3, "b": 6}, variant=variant, proj_dim=5)
    assert f.weight_gen.out_features == gen and f.in_proj.out_features == 6 == f.out_dim
    x = {"a": torch.randn(4, 3), "b": torch.randn(4, 6)}
    assert torch.allclose(f(x), _mi_by_hand(f, x), atol=1e-6)


def test_multiplicative_interaction_initial_scale_and_option_checks():
    torch.manual_seed(0)
    assert fuselab.create_fusion("mi", dims={"a": 3, "b": 4}).proj_dim == 32  # the default
    for variant, scale in (("matrix", 1 / 8 ** 0.5), ("vector", 1.0), ("scalar", 1.0)):
        f = fuselab.create_fusion("mi", dims={"a": 30, "b": 40}, variant=variant, proj_dim=8)
        bound = scale / f.weight_gen.in_features ** 0.5  # Linear's uniform bound, scaled by 1/sqrt(p) for matrix
        w = f.weight_gen.weight.detach().abs().max().item()
        assert 0.8 * bound < w <= bound, (variant, w, bound)
    with pytest.raises(ValueError, match=r"^mi: variant must be 'matrix', 'vector' or 'scalar', got 'diag'$"):
        fuselab.create_fusion("mi", dims={"a": 3, "b": 4}, variant="diag")


def test_low_rank_and_bilinear_options():
    assert fuselab.create_fusion("lmf", dims={"a": 3, "b": 4}, rank=1).rank == 1
    with pytest.raises(ValueError, match=r"^lmf: rank must be positive, got 0$"):
        fuselab.create_fusion("lmf", dims={"a": 3, "b": 4}, rank=0)
    mlb = fuselab.create_fusion("mlb", dims={"a": 3, "b": 4})
    assert mlb.proj["a"].out_features == 256 and mlb.out.in_features == 256  # the default mm_dim
    gated = fuselab.create_fusion("gated", dims={"a": 3, "b": 4})
    assert all(h.bias is None for h in gated.hidden.values())  # h_m = tanh(W_m x_m), no bias (GMU)


@pytest.mark.parametrize("n,expected", [(2, 63), (3, 15), (4, 7), (5, 4), (6, 3), (9, 1)])
def test_tfn_default_projection_is_the_largest_that_fits_4096_entries(n, expected):
    f = fuselab.create_fusion("tfn", dims={f"m{i}": 100 for i in range(n)})
    assert f.proj_dim == expected
    assert (expected + 1) ** n <= 4096 < (expected + 2) ** n
    assert f.out.in_features == (expected + 1) ** n


def test_tfn_projection_is_capped_by_the_widest_input_and_checked():
    assert fuselab.create_fusion("tfn", dims={"a": 5, "b": 6}).proj_dim == 6
    assert fuselab.create_fusion("tfn", dims={"a": 1, "b": 1}).proj_dim == 1
    assert fuselab.create_fusion("tfn", dims={"a": 5, "b": 6}, proj_dim=2).proj_dim == 2
    with pytest.raises(ValueError, match=r"^tfn: proj_dim must be positive, got 0$"):
        fuselab.create_fusion("tfn", dims={"a": 5, "b": 6}, proj_dim=0)


def test_late_weights_option():
    mean = fuselab.create_fusion("late", dims={"a": 3, "b": 2}, out_dim=4)
    assert mean.alpha is None
    learned = fuselab.create_fusion("late", dims={"a": 3, "b": 2, "c": 5}, out_dim=4, weights="learned")
    assert isinstance(learned.alpha, torch.nn.Parameter) and torch.equal(learned.alpha.data, torch.zeros(3))
    with pytest.raises(ValueError, match=r"^late: weights must be 'mean' or 'learned', got 'max'$"):
        fuselab.create_fusion("late", dims={"a": 3, "b": 2}, out_dim=4, weights="max")
    with pytest.raises(ValueError, match=r"^late: out_dim \(the number of classes\) is required$"):
        fuselab.create_fusion("late", dims={"a": 3, "b": 2})


def test_tfn_keeps_one_projected_feature_when_even_that_exceeds_4096_entries():
    f = fuselab.create_fusion("tfn", dims={f"m{i:02d}": 3 for i in range(13)})  # 2^13 = 8192 > 4096
    assert f.proj_dim == 1 and f.out.in_features == 2**13


def test_mfb_signed_square_root_is_finite_at_zero():
    torch.manual_seed(0)
    f = fuselab.create_fusion("mfb", dims={"a": 3, "b": 4}, out_dim=2, mm_dim=4, factor=2)
    for proj in f.proj.values():
        torch.nn.init.zeros_(proj.bias)
    x = {"a": torch.zeros(1, 3, requires_grad=True), "b": torch.randn(1, 4, requires_grad=True)}
    z = f(x)  # the product of the projections is exactly 0
    assert torch.allclose(z, f.out.bias[None])  # sign(0) * sqrt(0 + eps) = 0, then the L2 norm of 0 is 0
    z.sum().backward()
    assert torch.isfinite(x["a"].grad).all() and torch.isfinite(x["b"].grad).all()
