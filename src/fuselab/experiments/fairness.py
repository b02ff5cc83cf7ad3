"""Fair comparisons: scale each method's width so its parameter count matches the baseline's.

With ``match_params: true`` in a spec, every method's hidden width (``model.hidden``; ``model.width`` for
transformer models, in multiples of ``model.heads``) is searched by bisection over integers so that its
parameter count lands within :data:`TOLERANCE` of the baseline's. This happens when the spec is planned, so
the run configs carry the chosen width and the run ids say what was trained.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any

from fuselab.errors import ConfigError
from fuselab.train.config import apply_overrides

if TYPE_CHECKING:  # typing only: the spec calls match_widths when it plans with match_params
    from fuselab.experiments.spec import Spec

TOLERANCE = 0.05  # relative distance to the baseline's parameter count
WIDTH_KEYS = ("hidden", "width", "channels")  # the width option of a model builder, first found
MAX_WIDTH = 1 << 16


@dataclasses.dataclass
class Match:
    method: str
    key: str  # dotted config key, e.g. model.hidden
    width: int
    params: int
    target: int

    @property
    def ratio(self) -> float:
        return self.params / self.target


def width_option(cfg: Any) -> tuple[str, int]:
    """The model's width option (dotted key) and the step its values must be multiples of."""
    from fuselab.registry import MODELS

    name = cfg.model.name
    params = inspect.signature(MODELS.get(name)).parameters
    key = next((k for k in WIDTH_KEYS if k in params), None)
    if key is None:
        raise ConfigError(f"match_params: model '{name}' has no width option ({', '.join(WIDTH_KEYS)}) to scale")
    step = 1
    if "heads" in params:  # attention widths must be multiples of the head count
        heads = cfg.model.get("heads", params["heads"].default)
        step = int(heads) if isinstance(heads, int) and heads > 0 else 1
    return f"model.{key}", step


def parameter_count(cfg: Any, data: Any) -> int:
    """Parameters of the model a resolved run config describes (built on the CPU, not trained)."""
    import torch

    from fuselab.train.loop import count_parameters
    from fuselab.train.session import build_checked_model

    with torch.random.fork_rng(devices=[]):
        return count_parameters(build_checked_model(cfg, data))


def match_widths(spec: Spec, *, details: list[Match] | None = None) -> dict[str, dict[str, Any]]:
    """Per method (the baseline included) the width override that brings its parameter count within
    :data:`TOLERANCE` of the baseline's; ``details`` (a list) receives a :class:`Match` per method.

    Raises ``ConfigError`` when a method cannot get that close (its count does not grow with the width,
    or grows in steps larger than the tolerance).
    """
    from fuselab.train.session import cached_data

    seed = spec.seeds[0]

    def config(name: str, extra: dict[str, Any] | None = None) -> Any:
        method = next(m for m in spec.methods if m.name == name)
        overrides = {**method.overrides, **(extra or {})}  # matched before any tuning
        try:
            return apply_overrides(spec.base, overrides, seed=seed)
        except ConfigError as exc:
            raise ConfigError(f"spec '{spec.name}', method '{name}': {exc}") from None

    data_for = cached_data
    base_cfg = config(spec.baseline)
    target = parameter_count(base_cfg, data_for(base_cfg))
    out: dict[str, dict[str, Any]] = {}
    for method in spec.methods:
        cfg = config(method.name)
        key, step = width_option(cfg)
        data = data_for(cfg)
        counts: dict[int, int] = {}

        def count(k: int) -> int:
            if k not in counts:
                counts[k] = parameter_count(config(method.name, {key: k * step}), data)
            return counts[k]

        if method.name == spec.baseline:
            width = int(_current(cfg, key))
            out[method.name] = {key: width}
            if details is not None:
                details.append(Match(method.name, key, width, target, target))
            continue
        lo, hi = 1, max(1, int(_current(cfg, key)) // step)
        while count(hi) < target:  # grow the bracket until it holds the target
            lo, hi = hi, hi * 2
            if hi * step > MAX_WIDTH:
                raise ConfigError(f"match_params: method '{method.name}' stays below the baseline's {target:,} "
                                  f"parameters at {key}={lo * step}")
        while hi - lo > 1:  # smallest k with count(k) >= target lies in (lo, hi]
            mid = (lo + hi) // 2
            if count(mid) >= target:
                hi = mid
            else:
                lo = mid
        candidates = [k for k in (lo, hi) if k >= 1]
        best = min(candidates, key=lambda k: (abs(count(k) - target), k))
        params = count(best)
        if abs(params - target) > TOLERANCE * target:
            raise ConfigError(
                f"match_params: method '{method.name}' cannot get within {TOLERANCE:.0%} of the baseline's "
                f"{target:,} parameters by {key} (closest: {key}={best * step} with {params:,}, "
                f"{params / target - 1:+.1%}); leave it out or give it its own width")
        out[method.name] = {key: best * step}
        if details is not None:
            details.append(Match(method.name, key, best * step, params, target))
    return out


def _current(cfg: Any, key: str) -> Any:
    """The value of a dotted key in a run config, or the model builder's default."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if value is None:  # the builder's default
        from fuselab.registry import MODELS

        value = inspect.signature(MODELS.get(cfg.model.name)).parameters[key.split(".", 1)[1]].default
    return value
