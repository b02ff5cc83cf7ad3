"""Plugins: a user's own fusions, models, datasets and loss terms, without forking fuselab.

A plugin is a Python file or an importable module that registers things with the public decorators
(``register_fusion``, ``register_model``, ``register_dataset``, ``register_loss``). Plugins come from a spec's
``plugins:`` list, the ``--plugin`` option, or the ``fuselab.plugins`` entry-point group of installed
packages. Each registered id remembers the plugin and the hash of its source, and a run's id includes the
hashes of the plugins whose ids it uses, so changing an idea re-runs exactly the runs that use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from fuselab.registry import DATASETS, FUSIONS, LOSSES, MODELS, Registry
from fuselab.errors import ConfigError

ENTRY_POINT_GROUP = "fuselab.plugins"
REGISTRIES: dict[str, Registry] = {"fusion": FUSIONS, "model": MODELS, "dataset": DATASETS, "loss": LOSSES}


@dataclasses.dataclass(frozen=True)
class Plugin:
    source: str  # the path or module name as given
    module: str  # the imported module's name
    digest: str  # sha256 of its source files
    provides: tuple[tuple[str, str], ...]  # (kind, id) pairs it registered


_loaded: dict[str, Plugin] = {}  # key: resolved path or module name
_provider: dict[tuple[str, str], Plugin] = {}  # (kind, id) -> plugin


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _snapshot() -> set[tuple[str, str]]:
    return {(kind, name) for kind, reg in REGISTRIES.items() for name in reg.list()}


def load_plugin(source: str, *, base: Path | None = None) -> Plugin:
    """Import one plugin (a ``.py`` path, relative to ``base`` if given, or a module name); idempotent."""
    text = str(source)
    is_path = text.endswith(".py") or "/" in text or Path(text).exists()
    if is_path:
        path = Path(text).expanduser()
        if not path.is_absolute() and base is not None and not path.exists():
            path = base / path
        path = path.resolve()
        if not path.is_file():
            raise ConfigError(f"plugin '{text}' not found (looked for {path})")
        key, files = str(path), [path]
    else:
        key, files = text, []
    digest = _digest(files) if files else None
    if key in _loaded and (digest is None or _loaded[key].digest == digest):
        return _loaded[key]
    if key in _loaded:  # the file changed since it was loaded: its ids are replaced, not duplicated
        for kind, name in _loaded[key].provides:
            REGISTRIES[kind].unregister(name)
    before = _snapshot()
    try:
        if is_path:
            name = f"fuselab_plugin_{path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(text)
            name = module.__name__
            origin = Path(getattr(module, "__file__", "") or "")
            if origin.is_file():
                files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
            digest = _digest(files) if files else hashlib.sha256(name.encode()).hexdigest()[:16]
    except ConfigError:
        raise
    except ValueError as exc:  # a duplicate id from the registry, or the plugin's own check
        raise ConfigError(f"plugin '{text}': {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's, reported in one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"plugin '{text}' failed to import: {type(exc).__name__}: {first}") from None
    provides = tuple(sorted(_snapshot() - before))
    plugin = Plugin(text, name, digest or "", provides)
    _loaded[key] = plugin
    for item in provides:
        _provider[item] = plugin
    return plugin


def load_plugins(sources: list[str] | tuple[str, ...], *, base: Path | None = None) -> list[Plugin]:
    return [load_plugin(s, base=base) for s in sources]


def load_entry_points() -> list[Plugin]:
    """Load the plugins that installed packages declare in the ``fuselab.plugins`` entry-point group."""
    out = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        out.append(load_plugin(ep.value.split(":")[0]))
    return out


def from_plugin(kind: str, name: str) -> bool:
    """Was this id registered by a plugin (rather than by fuselab itself)?"""
    return (kind, name) in _provider


def provenance(config: dict[str, Any]) -> dict[str, str]:
    """``{"kind:id": source hash}`` for every id in a resolved run config that a plugin provides."""
    used: list[tuple[str, str]] = []
    for section, kind in (("data", "dataset"), ("model", "model"), ("fusion", "fusion"), ("exchange", "fusion")):
        name = (config.get(section) or {}).get("name")
        if name:
            used.append((kind, name))
    for term in (config.get("loss") or {}).get("terms") or []:
        used.append(("loss", term.get("name")))
    return {f"{kind}:{name}": _provider[(kind, name)].digest for kind, name in used if (kind, name) in _provider}
