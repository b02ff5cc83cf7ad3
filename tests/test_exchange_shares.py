"""The share of exchanged channels that CEN logs per epoch, against a count by hand from chosen BN scales."""

from __future__ import annotations

import pytest
import torch

import fuselab


def test_exchanged_share_counts_the_channels_whose_absolute_scale_is_below_the_threshold():
    op = fuselab.create_fusion("channel-exchange", dims={"a": 8, "b": 8}, threshold=0.1)
    gammas = {
        "a": [0.05, -0.05, 0.5, -0.5, 0.1, -0.1, 0.0, 2.0],  # |g| < 0.1: 0.05, -0.05, 0.0 -> 3 of 8
        "b": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -0.09],  # -0.09 -> 1 of 8
    }
    with torch.no_grad():
        for m, g in gammas.items():
            op.norms[m].weight.copy_(torch.tensor(g))
    stats = op.epoch_stats()
    assert stats["exchanged/a"] == pytest.approx(3 / 8) and stats["exchanged/b"] == pytest.approx(1 / 8)
    # the owned parts: a owns channels 0-3 (two below), b owns 4-7 (one below)
    assert op.parts == {"a": (0, 4), "b": (4, 8)}
    assert stats["exchanged_owned/a"] == pytest.approx(2 / 4) and stats["exchanged_owned/b"] == pytest.approx(1 / 4)
