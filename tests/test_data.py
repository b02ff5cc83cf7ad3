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


def test_a_lone_last_training_sample_joins_the_batch_before_it_when_asked():
    """Batch norm cannot train on one sample: with merge_lone (train.last_batch=merge) a last batch of one is
    merged into the one before (every sample still seen once per epoch); otherwise batches are left alone."""
    import torch

    from fuselab.data.core import ModalTensors

    split = ModalTensors({"a": torch.arange(9.0)[:, None]}, torch.arange(9))
    merged = list(split.batches(4, generator=torch.Generator().manual_seed(0), shuffle=True, merge_lone=True))
    assert [len(y) for _, y in merged] == [4, 5] and split.training_steps(4, merge_lone=True) == 2
    assert sorted(torch.cat([y for _, y in merged]).tolist()) == list(range(9))
    assert [len(y) for _, y in split.batches(4, shuffle=True)] == [4, 4, 1] and split.training_steps(4) == 3
    assert [len(y) for _, y in split.batches(4)] == [4, 4, 1]  # evaluation
    assert [len(y) for _, y in split.batches(3, shuffle=True, merge_lone=True)] == [3, 3, 3]
    assert [len(y) for _, y in split.batches(5, shuffle=True, merge_lone=True)] == [5, 4]  # more than one stays
    single = ModalTensors({"a": torch.zeros(1, 1)}, torch.zeros(1, dtype=torch.long))
    assert [len(y) for _, y in single.batches(4, shuffle=True, merge_lone=True)] == [1]


def test_a_batch_norm_fusion_trains_when_the_training_split_leaves_one_sample_over(tmp_path):
    """aff's batch norm in training mode fails on a batch of one: with one sample over, the default run stops
    with the one-line error naming train.last_batch=merge, and with that option it trains."""
    import torch

    from fuselab.data.core import DataBundle, ModalTensors
    from fuselab.experiments.spec import run_id
    from fuselab.losses import WeightedLoss
    from fuselab.train.config import make_config
    from fuselab.train.loop import fit, make_fabric
    from fuselab.train.session import build_model

    g = torch.Generator().manual_seed(0)

    def split(n):
        return ModalTensors({m: torch.randn(n, 2, 8, 8, generator=g) for m in ("a", "b")}, torch.arange(n) % 2)
    data = DataBundle(train=split(9), val=split(4), test=split(4), dims={"a": 2, "b": 2}, num_classes=2,
                      forms={"a": "map", "b": "map"})
    base = ["model.name=conv-streams", "model.widths=[4]", "fusion.name=aff", "train.epochs=1", "train.batch_size=4",
            "train.threads=1"]
    keep = make_config(None, base)
    with pytest.raises(ValueError, match=r"^aff: batch norm .*train\.last_batch=merge"):
        fit(build_model(keep, data), data, WeightedLoss([{"name": "ce"}]), keep.train, seed=0,
            fabric=make_fabric(keep.train))
    merge = make_config(None, [*base, "train.last_batch=merge"])
    result = fit(build_model(merge, data), data, WeightedLoss([{"name": "ce"}]), merge.train, seed=0,
                 fabric=make_fabric(merge.train))
    assert all(torch.isfinite(v).all() for v in result.state_dict.values())
    assert run_id(make_config(None, [*base, "train.last_batch=keep"])) == run_id(keep)  # stored runs keep their ids
    assert run_id(merge) != run_id(keep)
    with pytest.raises(Exception, match="train.last_batch' must be keep or merge"):
        make_config(None, [*base, "train.last_batch=drop"])
