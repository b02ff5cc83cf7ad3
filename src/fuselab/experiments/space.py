"""The search space of a spec's ``search`` block: its entries checked, the parameters that apply to a method,
and one value per parameter from an Optuna trial (``fuselab.experiments.tune`` runs the studies)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fuselab.errors import ConfigError
from fuselab.train.config import apply_overrides

if TYPE_CHECKING:  # typing only: the spec module imports this one
    from fuselab.experiments.spec import Spec

KINDS = ("loguniform", "uniform", "int", "logint", "choice")


@dataclasses.dataclass
class Param:
    key: str  # dotted config key
    kind: str  # one of KINDS
    args: list[Any]  # [low, high] or the choices


def parse_space(search: Any) -> list[Param]:
    """The search space of a spec's ``search`` block, checked (``ConfigError`` names the bad entry)."""
    if not search:
        return []
    if not isinstance(search, dict):
        raise ConfigError("spec key 'search' must map dotted config keys to {kind: [low, high]}")
    space = []
    for key, entry in search.items():
        if "." not in str(key):
            raise ConfigError(f"search key '{key}' must be a dotted config key, e.g. train.lr")
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in KINDS:
            raise ConfigError(f"search key '{key}' must be one of {{{': ..., '.join(KINDS)}: ...}}, got {entry!r}")
        kind, args = next(iter(entry.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search key '{key}': {kind} needs a list, e.g. {{{kind}: [low, high]}}")
        if kind != "choice":
            numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
            if len(args) != 2 or not numeric or not args[0] < args[1]:
                raise ConfigError(f"search key '{key}': {kind} needs [low, high] with low < high, got {args}")
            if kind in ("int", "logint") and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"search key '{key}': {kind} bounds must be integers, got {args}")
            if kind in ("loguniform", "logint") and args[0] <= 0:
                raise ConfigError(f"search key '{key}': {kind} needs a positive low bound, got {args[0]}")
        space.append(Param(str(key), kind, list(args)))
    return space


def suggest(trial: Any, space: Sequence[Param]) -> dict[str, Any]:
    """One value per parameter from an Optuna trial."""
    values: dict[str, Any] = {}
    for p in space:
        if p.kind == "loguniform":
            values[p.key] = trial.suggest_float(p.key, float(p.args[0]), float(p.args[1]), log=True)
        elif p.kind == "uniform":
            values[p.key] = trial.suggest_float(p.key, float(p.args[0]), float(p.args[1]))
        elif p.kind in ("int", "logint"):
            values[p.key] = trial.suggest_int(p.key, p.args[0], p.args[1], log=p.kind == "logint")
        else:
            values[p.key] = trial.suggest_categorical(p.key, p.args)
    return values


def _applies(spec: Spec, method: str, param: Param) -> bool:
    overrides = {**next(m for m in spec.methods if m.name == method).overrides, param.key: param.args[0]}
    try:
        apply_overrides(spec.base, overrides)
    except ConfigError as exc:
        if str(exc).startswith("unknown config"):
            return False
        raise ConfigError(f"spec '{spec.name}', method '{method}', search key '{param.key}': {exc}") from None
    return True


def method_space(spec: Spec, method: str) -> list[Param]:
    """The parameters of the spec's search space that the method's config has."""
    return [p for p in parse_space(spec.search) if _applies(spec, method, p)]


def check_space(spec: Spec) -> None:
    """Every search key must apply to at least one method of the spec."""
    used = {p.key for m in spec.methods for p in method_space(spec, m.name)}
    for p in parse_space(spec.search):
        if p.key not in used:
            raise ConfigError(f"search key '{p.key}' is a config key of no method of spec '{spec.name}'")
