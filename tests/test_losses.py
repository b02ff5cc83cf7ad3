from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fuselab.losses import WeightedLoss
from fuselab.models.output import ModelOutput


def _output():
    torch.manual_seed(0)
    return ModelOutput(
        logits=torch.randn(6, 3),
        modality_logits={"a": torch.randn(6, 3), "b": torch.randn(6, 3)},
        aux_losses={"exchange.sparsity": torch.tensor(0.5), "other.term": torch.tensor(2.0)},
    )


def test_weighted_sum_and_term_values():
    out, y = _output(), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = WeightedLoss([{"name": "ce", "weight": 1.0}, {"name": "aux-unimodal", "weight": 0.3}, {"name": "aux", "weight": 0.1}])
    total, values = loss(out, y)
    ce = F.cross_entropy(out.logits, y)
    uni = (F.cross_entropy(out.modality_logits["a"], y) + F.cross_entropy(out.modality_logits["b"], y)) / 2
    assert torch.allclose(values["ce"], ce) and torch.allclose(values["aux-unimodal"], uni)
    assert values["aux"].item() == pytest.approx(2.5)
    assert total.item() == pytest.approx(ce.item() + 0.3 * uni.item() + 0.25, rel=1e-6)
    assert loss.names == ["ce", "aux-unimodal", "aux"]


def test_label_smoothing_and_aux_filter():
    out, y = _output(), torch.tensor([0, 1, 2, 0, 1, 2])
    _, v = WeightedLoss([{"name": "ce", "label_smoothing": 0.1}])(out, y)
    assert torch.allclose(v["ce"], F.cross_entropy(out.logits, y, label_smoothing=0.1))
    _, v = WeightedLoss([{"name": "aux", "include": "exchange.*"}])(out, y)
    assert v["aux"].item() == pytest.approx(0.5)


def test_focal_reduces_to_ce_at_gamma_zero_and_matches_a_hand_value():
    out, y = _output(), torch.tensor([0, 1, 2, 0, 1, 2])
    _, v = WeightedLoss([{"name": "focal", "gamma": 0.0}])(out, y)
    assert torch.allclose(v["focal"], F.cross_entropy(out.logits, y))
    logits = torch.tensor([[2.0, 0.0]])
    p = math.exp(2) / (math.exp(2) + 1)
    _, v = WeightedLoss([{"name": "focal", "gamma": 2.0}])(ModelOutput(logits=logits), torch.tensor([0]))
    assert v["focal"].item() == pytest.approx(-((1 - p) ** 2) * math.log(p), rel=1e-5)


def test_aux_unimodal_without_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="model.modality_heads=true"):
        WeightedLoss([{"name": "aux-unimodal"}])(ModelOutput(logits=torch.randn(2, 3)), torch.tensor([0, 1]))


def test_unknown_term_and_empty_terms():
    with pytest.raises(ValueError, match="unknown loss 'cee'; did you mean 'ce'"):
        WeightedLoss([{"name": "cee"}])
    with pytest.raises(ValueError, match="loss.terms is empty"):
        WeightedLoss([])
