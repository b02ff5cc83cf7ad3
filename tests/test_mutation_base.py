"""The fusion contracts of ``fuselab.fusion.base``, message for message: every input check names the operator,
the modality and the fix, so a wrong condition, a wrong axis or a changed message fails here; and the
small helpers (feature axis, 1x1 projection on any form, order, stacking) against hand computations.

Legend: b batch, m modality, n tokens, d width, c channels, h height, w width of a map.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

from fuselab import create_fusion
from fuselab.fusion.base import (
    ChannelLinear,
    Exchange,
    FusionBase,
    Merge,
    WrappingExchange,
    _shape,
    check_dims,
    feature_axis,
    resolve_order,
    stack,
)


def _raises(message: str):
    """The whole message, exactly."""
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


# -- helpers -----------------------------------------------------------------------------------------------


def test_check_dims_accepts_positive_widths_and_keeps_their_order():
    assert check_dims({"b": 3, "a": 1}, "X") == {"b": 3, "a": 1}
    assert list(check_dims({"b": 3, "a": 1}, "X")) == ["b", "a"]
    assert check_dims({"a": 1}, "X", minimum=1) == {"a": 1}


@pytest.mark.parametrize(
    ("dims", "minimum", "message"),
    [
        ([("a", 1), ("b", 2)], 2, "X: dims must be a mapping of modality name -> width, got list"),
        ({"a": 1}, 2, "X: needs at least 2 modalities, got 1 (a)"),
        ({}, 2, "X: needs at least 2 modalities, got 0 (none)"),
        ({"a": 1, "b": 2}, 3, "X: needs at least 3 modalities, got 2 (a, b)"),
        ({"": 1, "b": 2}, 2, "X: modality names must be non-empty strings, got ''"),
        ({1: 1, "b": 2}, 2, "X: modality names must be non-empty strings, got 1"),
        ({"a": True, "b": 2}, 2, "X: modality 'a' needs a positive integer width, got True"),
        ({"a": 4, "b": 0}, 2, "X: modality 'b' needs a positive integer width, got 0"),
        ({"a": 4, "b": 2.0}, 2, "X: modality 'b' needs a positive integer width, got 2.0"),
        ({"a": 4, "b": -3}, 2, "X: modality 'b' needs a positive integer width, got -3"),
    ],
)
def test_check_dims_names_what_is_wrong(dims, minimum, message):
    with _raises(message):
        check_dims(dims, "X", minimum=minimum)


def test_resolve_order_is_sorted_or_a_permutation():
    assert resolve_order(["b", "c", "a"], None, "X") == ["a", "b", "c"]
    order = resolve_order(["a", "b"], ("b", "a"), "X")
    assert order == ["b", "a"] and isinstance(order, list)
    with _raises("X: order ['b', 'b'] must list each modality exactly once; modalities are ['a', 'b']"):
        resolve_order(["b", "a"], ["b", "b"], "X")
    with _raises("X: order ['a'] must list each modality exactly once; modalities are ['a', 'b']"):
        resolve_order(["a", "b"], ["a"], "X")


def test_feature_axis_shape_text_and_stack():
    assert feature_axis(torch.zeros(2, 3, 4, 5)) == 1
    assert feature_axis(torch.zeros(2, 3, 4)) == -1 and feature_axis(torch.zeros(2, 3)) == -1
    assert _shape(torch.zeros(2, 3, 4)) == "(2, 3, 4)" and _shape(torch.zeros(7)) == "(7)"
    xs = {"b": torch.full((2, 3), 1.0), "a": torch.full((2, 3), 2.0)}
    stacked = stack(xs)
    assert stacked.shape == (2, 2, 3)
    assert torch.equal(stacked[0], xs["b"]) and torch.equal(stacked[1], xs["a"])  # (M, B, ...) in dict order


def test_channel_linear_is_a_1x1_convolution_on_maps_and_a_linear_layer_otherwise():
    torch.manual_seed(0)
    layer = ChannelLinear(3, 4)
    x = torch.randn(2, 3, 5, 6)
    by_hand = torch.einsum("oc,bchw->bohw", layer.weight, x) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), by_hand)
    tokens = torch.randn(2, 7, 3)
    torch.testing.assert_close(layer(tokens), tokens @ layer.weight.T + layer.bias)
    vec = torch.randn(2, 3)
    torch.testing.assert_close(layer(vec), vec @ layer.weight.T + layer.bias)


def test_defaults_of_every_operator():
    class Plain(FusionBase):
        pass

    assert Plain().aux_losses() == {}
    assert Plain.fusion_problem({"anything": 1}) is None
    assert (Plain.contract, Plain.kind, Plain.forms, Plain.supports_missing, Plain.same_size) == (
        "", "", ("vector",), False, True)
    assert (Merge.contract, Merge.kind, Exchange.contract, Exchange.kind) == ("merge", "merge", "exchange", "standalone")
    assert (WrappingExchange.contract, WrappingExchange.kind, WrappingExchange.forms) == (
        "exchange", "wrapping", ("tokens",))


# -- the input checks of every operator --------------------------------------------------------------------


def test_merge_options_are_checked_when_built():
    op = create_fusion("concat", dims={"b": 2, "a": 3})
    assert op.modalities == ["a", "b"] and op.dims == {"b": 2, "a": 3} and op.out_dim == 5
    for bad in (True, 0, -1, 2.5):
        with _raises(f"Concat: out_dim must be a positive integer or None, got {bad!r}"):
            create_fusion("concat", dims={"a": 2, "b": 3}, out_dim=bad)
    with _raises("Concat: needs at least 2 modalities, got 1 (a)"):
        create_fusion("concat", dims={"a": 2})
    assert create_fusion("concat", dims={"a": 2, "b": 3}, out_dim=1).out_dim == 1


def test_check_inputs_names_every_wrong_input():
    op = create_fusion("concat", dims={"a": 4, "b": 3})
    a, b = torch.zeros(2, 4), torch.zeros(2, 3)
    with _raises("Concat: expected a mapping of modality name -> tensor, got list"):
        op([a, b])
    with _raises("Concat: unexpected modality 'c'; it was built for ['a', 'b']"):
        op({"a": a, "b": b, "z": b, "c": b})
    with _raises("Concat: missing modality 'a'; expected keys ['a', 'b']"):
        op({"b": b})
    with _raises("Concat: modality 'a' must be a tensor, got list"):
        op({"a": [1.0], "b": b})
    with _raises("Concat: modality 'b' must be vector (B, D) or tokens (B, N, D) or map (B, C, H, W), got shape (3)"):
        op({"a": a, "b": torch.zeros(3)})
    with _raises("Concat: modality 'b' must have width 3 on axis 1, got shape (2, 4)"):
        op({"a": a, "b": torch.zeros(2, 4)})
    with _raises("Concat: modality 'b' must have width 3 on axis 2, got shape (2, 5, 4)"):
        op({"a": torch.zeros(2, 5, 4), "b": torch.zeros(2, 5, 4)})
    with _raises("Concat: modality 'b' must have width 3 on axis 1, got shape (2, 4, 6, 6)"):
        op({"a": torch.zeros(2, 4, 6, 6), "b": torch.zeros(2, 4, 6, 6)})
    with _raises("Concat: modality 'b' has shape (3, 3) but 'a' has (2, 4); "
                 "all modalities need the same form and batch size"):
        op({"a": a, "b": torch.zeros(3, 3)})
    with _raises("Concat: modality 'b' has shape (2, 5, 3) but 'a' has (2, 4); "
                 "all modalities need the same form and batch size"):
        op({"a": a, "b": torch.zeros(2, 5, 3)})
    with _raises("Concat: modality 'b' has shape (2, 3, 5, 6) but 'a' has (2, 4, 6, 6); the spatial size must match"):
        op({"a": torch.zeros(2, 4, 6, 6), "b": torch.zeros(2, 3, 5, 6)})
    with _raises("Concat: modality 'b' has shape (2, 6, 3) but 'a' has (2, 5, 4); the token count must match"):
        op({"a": torch.zeros(2, 5, 4), "b": torch.zeros(2, 6, 3)})


def test_check_inputs_of_a_map_operator_names_the_map_form_only():
    op = create_fusion("channel-exchange-p", dims={"a": 4, "b": 4})
    with _raises("ChannelExchangeP: modality 'a' must be map (B, C, H, W), got shape (2, 4)"):
        op({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)})


def test_check_inputs_returns_the_present_modalities_in_sorted_order():
    op = create_fusion("sum", dims={"c": 3, "a": 3, "b": 3})  # supports a missing modality
    xs = {"c": torch.ones(2, 3), "a": torch.zeros(2, 3)}
    checked = op.check_inputs(xs)
    assert list(checked) == ["a", "c"] and checked["c"] is xs["c"]
    with _raises("Sum: missing modality 'a'; expected keys ['a', 'b', 'c']"):
        op({})  # missing modalities are allowed, but not all of them
    full = create_fusion("concat", dims={"b": 1, "a": 2})
    out = full({"b": torch.full((1, 1), 5.0), "a": torch.tensor([[1.0, 2.0]])})
    assert out.tolist() == [[1.0, 2.0, 5.0]]  # sorted order whatever the dict order


def test_an_exchange_that_changes_a_shape_is_an_error_of_the_operator():
    class Shrink(Exchange):
        forms = ("vector",)

        def exchange(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
            return {m: x[:, :1] if m == "b" else x for m, x in xs.items()}

    op = Shrink({"b": 2, "a": 2})
    assert op.modalities == ["a", "b"] and op.dims == {"b": 2, "a": 2}
    with pytest.raises(RuntimeError, match=r"^Shrink changed the shape of 'b'$"):
        op({"a": torch.zeros(3, 2), "b": torch.zeros(3, 2)})
    with _raises("Shrink: needs at least 2 modalities, got 1 (a)"):
        Shrink({"a": 2})

    class Keep(Exchange):
        forms = ("vector",)

        def exchange(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
            return {m: x + 1 for m, x in xs.items()}

    out = Keep({"a": 2, "b": 2})({"b": torch.zeros(3, 2), "a": torch.ones(3, 2)})
    assert torch.equal(out["a"], torch.full((3, 2), 2.0)) and torch.equal(out["b"], torch.ones(3, 2))


def test_wrapping_exchange_needs_two_modalities_of_equal_depth():
    class Wrap(WrappingExchange):
        pass

    layers = {"b": [nn.Identity(), nn.Identity()], "a": [nn.ReLU(), nn.Identity()]}
    op = Wrap(layers)
    assert op.modalities == ["a", "b"] and op.depth == 2
    assert isinstance(op.layers["a"][0], nn.ReLU) and len(op.layers["b"]) == 2
    with _raises("Wrap: needs the layers of at least 2 modalities, got 1"):
        Wrap({"a": [nn.Identity()]})
    with _raises("Wrap: needs the layers of at least 2 modalities, got 0"):
        Wrap([[nn.Identity()], [nn.Identity()]])
    with _raises("Wrap: every modality needs the same number of layers, got {'a': 1, 'b': 2}"):
        Wrap({"a": [nn.Identity()], "b": [nn.Identity(), nn.Identity()]})


def test_fusion_info_as_a_dict_has_every_field():
    from fuselab import fusion_info

    info = fusion_info("concat")
    d = info.as_dict()
    assert list(d) == ["id", "contract", "kind", "forms", "multimodal_rule", "supports_missing", "natural_out_dim",
                       "paper", "reference", "formula", "asymmetric", "produces_logits", "options"]
    assert (d["id"], d["contract"], d["kind"], d["forms"]) == ("concat", "merge", "merge", ("vector", "tokens", "map"))
    assert d["options"] == info.options and d["paper"] == info.paper
