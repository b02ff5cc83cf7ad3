"""Public entry points for fusion operators: create, list, describe."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

import fuselab.fusion  # noqa: F401  (registers the built-in operators)
from fuselab.fusion.base import FusionInfo
from fuselab.registry import FUSIONS

_STRUCTURAL = ("self", "dims", "out_dim", "layers")


def _options(cls: type) -> dict[str, Any]:
    sig = inspect.signature(cls.__init__)
    return {
        name: (None if p.default is inspect.Parameter.empty else p.default)
        for name, p in sig.parameters.items()
        if name not in _STRUCTURAL and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def create_fusion(name: str, /, **kwargs: Any) -> nn.Module:
    """Build a registered fusion operator.

    ``create_fusion("lmf", dims={"a": 64, "b": 32}, out_dim=128, rank=8)``. Options given as ``None`` are
    dropped so that the operator's own defaults apply. An option the operator does not have is a
    ``ValueError`` naming the options it does have.
    """
    cls = FUSIONS.get(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params) - {"self"})
        if unknown:
            opts = ", ".join(sorted(_options(cls))) or "none"
            raise ValueError(f"fusion '{name}' has no option '{unknown[0]}'; its options are: {opts}")
    return cls(**kwargs)


def list_fusions(pattern: str = "*") -> list[str]:
    """Sorted ids of the registered fusion operators matching a shell-style pattern."""
    return FUSIONS.list(pattern)


def fusion_info(name: str) -> FusionInfo:
    """What a fusion operator is: contract, kind, forms, multi-modality rule, paper, reference, formula."""
    cls = FUSIONS.get(name)
    return FusionInfo(
        id=name,
        contract=cls.contract,
        kind=cls.kind,
        forms=tuple(cls.forms),
        multimodal_rule=cls.multimodal_rule,
        supports_missing=cls.supports_missing,
        natural_out_dim=cls.natural_out_dim,
        paper=cls.paper,
        reference=cls.reference,
        formula=cls.formula,
        asymmetric=cls.asymmetric,
        produces_logits=cls.produces_logits,
        options=_options(cls),
    )
