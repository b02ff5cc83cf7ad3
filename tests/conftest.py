"""Shared test fixtures: the real-data root, small deterministic settings, and the tiny mfeat experiment spec
the experiment, store, fault, security, profile, tuning and robustness tests sweep (``tiny_spec``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def tiny_spec(name: str = "tiny", *, hidden: int = 32, epochs: int = 3, grid: Sequence[str] = ("concat", "sum"),
              variants: Sequence[dict[str, Any]] = (), seeds: Sequence[int] = (0,), baseline: bool = True,
              **train: Any) -> dict[str, Any]:
    """A fresh tiny experiment spec on two mfeat views (a few seconds a run on a 2-core CPU): mlp-streams of
    width ``hidden``, ``epochs`` epochs of batch 64 plus the ``train`` options given (``lr``, ``threads``), a
    grid over ``fusion.name``, optional named ``variants``, the ``seeds``, and the grid's first fusion as the
    baseline unless ``baseline=False``. Import it (``from conftest import tiny_spec``) or take the fixture."""
    spec: dict[str, Any] = {
        "name": name,
        "base": {
            "data": {"name": "mfeat", "views": ["fou", "kar"]},
            "model": {"name": "mlp-streams", "hidden": hidden},
            "train": {"epochs": epochs, "batch_size": 64, **train},
        },
        "grid": {"fusion.name": list(grid)},
    }
    if variants:
        spec["variants"] = [dict(v) for v in variants]
    spec["seeds"] = list(seeds)
    if baseline:
        spec["baseline"] = {"fusion.name": grid[0]}
    return spec


@pytest.fixture(name="tiny_spec")
def tiny_spec_fixture() -> Any:
    """:func:`tiny_spec`, as a fixture."""
    return tiny_spec


def run_cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    """``fuselab ARGS`` in this process: (exit code, stdout, stderr)."""
    from fuselab.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# a small real run: two mfeat views, three epochs (test_session, test_evaluate and test_predict use it)
SMALL_RUN = {
    "data": {"name": "mfeat", "views": ["fou", "kar"]},
    "model": {"name": "mlp-streams", "hidden": 32},
    "train": {"epochs": 3, "batch_size": 64, "lr": 5.0e-3, "threads": 1},
}


@pytest.fixture(scope="module")
def mfeat_run(tmp_path_factory: Any) -> Any:
    """(run folder, RunResult) of :data:`SMALL_RUN`, trained once per test module."""
    from fuselab.train.config import make_config
    from fuselab.train.run import execute

    folder = tmp_path_factory.mktemp("small-run") / "run"
    return folder, execute(make_config(SMALL_RUN), folder)
