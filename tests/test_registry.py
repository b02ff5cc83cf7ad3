from __future__ import annotations

import pytest
from torch import nn

import fuselab
from fuselab.registry import Registry


def test_register_get_list_and_pattern():
    reg = Registry("widget")

    @reg.register("alpha")
    class Alpha:
        pass

    reg.register("beta", object)
    assert reg.get("alpha") is Alpha
    assert reg.list() == ["alpha", "beta"]
    assert reg.list("a*") == ["alpha"]
    assert "beta" in reg and "gamma" not in reg


def test_duplicate_is_an_error_unless_override():
    reg = Registry("widget")
    reg.register("alpha", int)
    with pytest.raises(ValueError, match="widget 'alpha' is already registered"):
        reg.register("alpha", float)
    reg.register("alpha", float, override=True)
    assert reg.get("alpha") is float


def test_unknown_id_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown fusion 'concta'; did you mean 'concat'"):
        fuselab.create_fusion("concta", dims={"a": 2, "b": 2})


def test_public_register_fusion_rejects_builtin_id():
    with pytest.raises(ValueError, match="already registered"):

        @fuselab.register_fusion("concat")
        class Mine(nn.Module):
            pass


def test_the_fourteen_vector_ids_are_listed():
    expected = {"concat", "sum", "mean", "max", "product", "attention", "gated", "film", "tfn", "lmf", "mi", "mlb", "mfb", "late"}
    assert expected <= set(fuselab.list_fusions())
    assert fuselab.list_fusions() == sorted(fuselab.list_fusions())
    assert fuselab.list_fusions("m*") == sorted(i for i in fuselab.list_fusions() if i.startswith("m"))


def test_create_fusion_drops_none_and_rejects_unknown_option():
    f = fuselab.create_fusion("lmf", dims={"a": 3, "b": 4}, out_dim=None, rank=None)
    assert f.rank == 16 and f.out_dim == 4
    with pytest.raises(ValueError, match="fusion 'lmf' has no option 'rnak'; its options are: rank"):
        fuselab.create_fusion("lmf", dims={"a": 3, "b": 4}, rnak=3)


def test_fusion_info_is_filled_for_every_operator():
    for name in fuselab.list_fusions():
        info = fuselab.fusion_info(name)
        assert info.id == name
        assert info.contract in ("merge", "exchange")
        assert info.kind in ("merge", "standalone", "wrapping")
        assert info.forms and set(info.forms) <= {"vector", "tokens", "map"}
        for field in ("multimodal_rule", "paper", "reference", "formula"):
            assert getattr(info, field), f"{name}: fusion_info.{field} is empty"
        if info.contract == "merge":
            assert info.natural_out_dim, name
