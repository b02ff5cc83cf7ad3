from __future__ import annotations

import numpy as np
import pytest
import torch

import fuselab
from fuselab.data.core import stratified_split
from fuselab.data.mfeat import VIEWS, mfeat


def test_bundled_mfeat_has_six_views_and_an_80_20_stratified_split():
    b = mfeat(seed=0)
    assert b.dims == VIEWS and b.num_classes == 10
    assert (len(b.train), len(b.val), len(b.test)) == (1400, 200, 400)
    for split in (b.train, b.val, b.test):
        counts = torch.bincount(split.y, minlength=10)
        assert (counts == counts[0]).all()  # every class equally represented
    assert b.train.x["fac"].shape == (1400, 216)


def test_bundled_copy_equals_the_shared_csvs(data_root):
    import pandas as pd

    from fuselab.data.mfeat import load_mfeat

    bundled, y1 = load_mfeat(("fou", "mor"), None)
    shared, y2 = load_mfeat(("fou", "mor"), str(data_root / "mfeat"))
    assert np.array_equal(y1, y2)
    assert np.array_equal(bundled["fou"], shared["fou"]) and np.array_equal(bundled["mor"], shared["mor"])
    raw = pd.read_csv(data_root / "mfeat" / "mfeat-mor.csv").to_numpy()
    assert np.allclose(shared["mor"], raw[:, :-1].astype(np.float32))


def test_split_is_fixed_by_the_seed_and_disjoint():
    labels = np.repeat(np.arange(10), 200)
    a = stratified_split(labels, {"train": 0.0, "val": 0.1, "test": 0.2}, seed=3)
    b = stratified_split(labels, {"train": 0.0, "val": 0.1, "test": 0.2}, seed=3)
    c = stratified_split(labels, {"train": 0.0, "val": 0.1, "test": 0.2}, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    union = np.concatenate(list(a.values()))
    assert len(union) == len(set(union.tolist())) == 2000


def test_standardisation_is_fitted_on_train_only():
    b = mfeat(seed=1)
    x = b.train.x["kar"]
    assert torch.allclose(x.mean(0), torch.zeros(64), atol=1e-4)
    assert torch.allclose(x.std(0), torch.ones(64), atol=1e-3)
    assert not torch.allclose(b.test.x["kar"].mean(0), torch.zeros(64), atol=1e-3)  # test is not re-centred


def test_views_option_and_bad_view():
    b = mfeat(seed=0, views=["pix", "mor"])
    assert b.modalities == ["mor", "pix"] and b.dims == {"pix": 240, "mor": 6}
    with pytest.raises(ValueError, match="unknown mfeat view 'pixx'; the views are fou, fac, kar, pix, zer, mor"):
        mfeat(views=["pixx", "mor"])


def test_dataset_registry():
    assert "mfeat" in fuselab.DATASETS.list()
    with pytest.raises(ValueError, match="unknown dataset 'mfet'; did you mean 'mfeat'"):
        fuselab.DATASETS.get("mfet")
