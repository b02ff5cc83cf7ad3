"""One registry type for every family of pluggable parts (fusions, models, datasets, losses).

A registry maps an id to a class or factory. Ids are unique: registering an existing id is an error
unless ``override=True`` (in a comparison, a plugin that silently replaced a built-in would be worse
than a crash). Unknown ids fail with the closest known ids.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Registry:
    """A named collection of ids -> objects, filled by a decorator.

    Args:
        kind: what the registry holds, singular ("fusion", "model"); used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, obj: T | None = None, *, override: bool = False):
        """Register ``obj`` under ``name``; used bare as ``@REGISTRY.register("id")``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} id must be a non-empty string, got {name!r}")

        def add(target: T) -> T:
            if name in self._entries and not override and self._entries[name] is not target:
                raise ValueError(
                    f"{self.kind} '{name}' is already registered; pick another id or pass override=True"
                )
            self._entries[name] = target
            return target

        return add(obj) if obj is not None else add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> Any:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.5)
        if close:
            hint = "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
        else:
            hint = f"known: {', '.join(sorted(self._entries))}"
        return f"unknown {self.kind} '{name}'; {hint}"

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"


FUSIONS = Registry("fusion")
MODELS = Registry("model")
DATASETS = Registry("dataset")
LOSSES = Registry("loss")


def _decorator(registry: Registry) -> Callable[..., Any]:
    def register(name: str, obj: Any = None, *, override: bool = False):
        return registry.register(name, obj, override=override)

    register.__doc__ = f"Register a {registry.kind}: ``@register_{registry.kind}('id')``."
    return register


register_fusion = _decorator(FUSIONS)
register_model = _decorator(MODELS)
register_dataset = _decorator(DATASETS)
register_loss = _decorator(LOSSES)
