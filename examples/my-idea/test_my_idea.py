"""The plugin's own test: run with `python -m pytest examples/my-idea`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fuselab
from fuselab.models.output import ModelOutput
from fuselab.plugins import load_plugin


@pytest.fixture(autouse=True, scope="module")
def plugin():
    """Loaded when these tests run, not when they are collected."""
    return load_plugin(str(Path(__file__).with_name("my_idea.py")))


def test_gated_sum_is_the_gated_sum_of_projections():
    f = fuselab.create_fusion("gated-sum", dims={"a": 3, "b": 5}, out_dim=4)
    x = {"a": torch.randn(2, 3), "b": torch.randn(2, 5)}
    expected = sum(torch.sigmoid(f.gate[m](x[m])) * f.proj[m](x[m]) for m in "ab")
    assert torch.allclose(f(x), expected)
    assert f(x).shape == (2, 4)


def test_confidence_penalty_is_minus_the_entropy():
    from fuselab.registry import LOSSES

    term = LOSSES.get("confidence-penalty")()
    uniform = ModelOutput(logits=torch.zeros(1, 4))
    assert torch.isclose(term(uniform, torch.tensor([0])), -torch.log(torch.tensor(4.0)))
