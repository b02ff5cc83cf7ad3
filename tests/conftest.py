"""Shared test fixtures: the real-data root and small deterministic settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """``FUSELAB_DATA`` (the shared real datasets). Missing data fails under CI and skips elsewhere."""
    root = os.environ.get("FUSELAB_DATA")
    path = Path(root) if root else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"FUSELAB_DATA={root!r} is not a folder; CI must provide the real datasets")
        pytest.skip("real datasets not available (set FUSELAB_DATA)")
    return path
