"""Fusion operators behind two contracts (Merge, Exchange); importing this package registers them all."""

from fuselab.fusion import basic, bottleneck, difference, exchange, gating, maps, tensor, tokens  # noqa: F401  (registration side effects)
from fuselab.fusion.base import (
    ChannelLinear,
    Exchange,
    FusionBase,
    FusionInfo,
    Merge,
    WrappingExchange,
)

__all__ = ["ChannelLinear", "Exchange", "FusionBase", "FusionInfo", "Merge", "WrappingExchange"]
