"""Experiment specs: a base run config, a grid and named variants, seeds, a baseline and a metric.

A spec expands into *methods* (each a set of overrides of the base) times *seeds*; each pair is a run
whose id is a hash of its resolved config.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fuselab.errors import ConfigError
from fuselab.metrics import METRICS as TASK_METRICS
from fuselab.experiments.space import check_space, parse_space
from fuselab.train.config import apply_overrides, read_yaml

# every key a spec may have, with what it means (the reference page is generated from this table)
SPEC_HELP = {
    "name": "experiment name (the store keys the experiment by it; default: the file name)",
    "description": "free text: the caption of the report's tables starts with it",
    "base": "the run config every method starts from (sections data, model, fusion, exchange, loss, train)",
    "grid": "dotted config keys mapped to lists of values; their product gives one method per combination",
    "variants": "a list of named override sets (`name:` plus config sections), for options only some methods have",
    "seeds": "a list of seeds, or a count (0..N-1); a seed fixes split, initialisation and batch order",
    "baseline": "a variant name or an override set naming the method the others are tested against",
    "metric": "the primary test metric of the table and the tests: accuracy, macro_f1, kappa, f1_change, iou_change or miou",
    "plugins": "plugin files (relative to the spec) or module names to load before the spec is read",
    "search": "tuning space: dotted config keys mapped to one of {loguniform, uniform, int, logint, choice: [...]} (`fuselab tune`)",
    "direction": "maximize (default) or minimize the validation metric while tuning",
    "budget": "equal-epochs (default: every method trains the base's epochs) or equal-trials (each method is tuned "
              "with `trials` trials on validation before its seeds run)",
    "match_params": "true: scale each method's width option until its parameter count is within 5 % of the baseline's",
    "trials": "Optuna trials per method under budget equal-trials (default 20)",
    "evaluate": "named extra test sets, each a mapping of dotted overrides of the run config (typically `data.*`, "
                "data the trained weights fit): after training, `fuselab compare` scores every done run on each "
                "(`<run>/evaluations/<name>.json`) and the report shows one transfer column per set; not part of run ids",
}
SPEC_KEYS = tuple(SPEC_HELP)
BUDGETS = ("equal-epochs", "equal-trials")
METRICS = tuple(dict.fromkeys(m for task in TASK_METRICS.values() for m in task))  # the test metrics of the tasks
# execution details: they change how a run executes, not what it computes, so they are not in its id
EXECUTION_KEYS = (
    "train.threads", "train.tensorboard", "train.checkpoint", "train.eval_batch_size", "train.checkpoint_every",
    "train.logger", "train.mlflow_uri",
)

# config keys added after runs were first stored, with the values that mean "as before they existed": at
# those values they are left out of the run id, so adding a key never invalidates a store's finished runs
NEUTRAL_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "train.modality_dropout": (0, 0.0, None, {}),
    "train.num_nodes": (1,),
    "train.strategy": ("auto",),
    "train.optimizer": ("adamw",),
    "train.momentum": (0.9,),
    "train.nesterov": (False,),
    "train.no_decay_norm_bias": (False,),
    "train.freeze_bn": (False,),
    "train.freeze_bn_epoch": (0,),
    "train.channels_last": (False,),
    "train.compile": (False,),
    "train.last_batch": ("keep",),
}


@dataclasses.dataclass
class Method:
    name: str
    overrides: dict[str, Any]  # dotted key -> value, applied on top of the base


@dataclasses.dataclass
class PlannedRun:
    run_id: str
    method: str
    seed: int
    config: DictConfig


@dataclasses.dataclass
class Spec:
    name: str
    base: dict[str, Any]
    methods: list[Method]
    seeds: list[int]
    baseline: str  # a method name
    metric: str = "accuracy"
    description: str = ""
    source: dict[str, Any] = dataclasses.field(default_factory=dict)  # the spec as written
    plugins: list[str] = dataclasses.field(default_factory=list)  # resolved plugin paths / module names
    # tuning and fair comparisons (fuselab.experiments.tune / fairness)
    search: dict[str, Any] = dataclasses.field(default_factory=dict)  # dotted key -> {loguniform: [lo, hi]} ...
    direction: str = "maximize"  # of the validation metric while tuning
    budget: str = "equal-epochs"  # or equal-trials: each method tuned with ``trials`` trials before its seeds
    match_params: bool = False  # scale each method's width to the baseline's parameter count (within 5 %)
    trials: int = 20  # trials per method under budget equal-trials
    tuned: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # method -> best overrides
    matched: dict[str, dict[str, Any]] | None = None  # method -> width override, filled on first use
    overrides: list[str] = dataclasses.field(default_factory=list)  # dotted key=value over every method (command line)
    evaluate: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # test set name -> dotted overrides

    def method_overrides(self, name: str) -> dict[str, Any]:
        """A method's overrides of the base: its own, then its matched width, then its tuned values."""
        method = next((m for m in self.methods if m.name == name), None)
        if method is None:
            raise ConfigError(f"spec '{self.name}' has no method '{name}'; methods are: "
                              f"{', '.join(m.name for m in self.methods)}")
        if self.match_params and self.matched is None:
            from fuselab.experiments.fairness import match_widths

            self.matched = match_widths(self)
        return {**method.overrides, **(self.matched or {}).get(name, {}), **self.tuned.get(name, {})}

    def config(self, method: str, seed: int | None = None) -> DictConfig:
        """The resolved run config of ``method`` (its overrides, matched width and tuned values over the base)
        for ``seed`` (default: the first seed): the one way a spec becomes a run config."""
        seed = self.seeds[0] if seed is None else seed
        overrides = self.method_overrides(method)
        try:
            cfg = apply_overrides(self.base, overrides, seed=seed)
            if self.overrides:  # the command line's, over every method's own (as `fuselab run` applies them)
                from fuselab.train.config import make_config

                cfg = make_config(OmegaConf.to_container(cfg, resolve=True), [*self.overrides, f"seed={int(seed)}"])
        except ConfigError as exc:
            raise ConfigError(f"spec '{self.name}', method '{method}': {exc}") from None
        if cfg.train.devices > 1 or cfg.train.num_nodes > 1:
            raise ConfigError(
                f"spec '{self.name}', method '{method}': train.devices/num_nodes > 1 spread one run over "
                "several devices; launch it with `fuselab run` (torchrun or SLURM), compare trains one device per run"
            )
        return cfg

    def plan(self) -> list[PlannedRun]:
        """Every (method, seed) run with its resolved config, checked before anything runs."""
        runs = []
        for method in self.methods:
            for seed in self.seeds:
                cfg = self.config(method.name, seed)
                runs.append(PlannedRun(run_id(cfg), method.name, seed, cfg))
        return runs


def run_id(cfg: DictConfig) -> str:
    """Hash of the resolved config, seed included, execution details excluded; with the source hashes of
    the plugins that provide ids the config uses (a changed plugin gives new ids)."""
    from fuselab.plugins import provenance

    container = OmegaConf.to_container(cfg, resolve=True)
    plugins = provenance(container)
    if plugins:
        container["plugins"] = plugins
    if container.get("control") is False:
        del container["control"]  # added later: only a control hashes it, so stored runs keep their ids
    for section in [k for k, v in container.items() if v == {}]:
        del container[section]  # an unused optional section (exchange) must not change the ids of old runs
    for key in EXECUTION_KEYS:
        section, leaf = key.split(".")
        container.get(section, {}).pop(leaf, None)
    for key, neutral in NEUTRAL_DEFAULTS.items():  # keys added later hash only when set, so stores keep their cache
        section, leaf = key.split(".")
        if leaf in container.get(section, {}) and container[section][leaf] in neutral:
            del container[section][leaf]
    blob = json.dumps(container, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shipped_specs() -> dict[str, Path]:
    folder = resources.files("fuselab") / "specs"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def load_spec(name_or_path: str | Path, *, plugins: list[str] | tuple[str, ...] = ()) -> Spec:
    """A spec by shipped name (``mfeat-compare``) or by path to a YAML file; ``plugins`` are loaded first,
    then the spec's own ``plugins:`` (paths relative to the spec file)."""
    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        shipped = shipped_specs()
        if text not in shipped:
            close = difflib.get_close_matches(text, list(shipped), n=3, cutoff=0.5)
            hint = ("did you mean " + " or ".join(f"'{c}'" for c in close) + "?") if close else (
                f"shipped specs: {', '.join(sorted(shipped))}, or give a path to a .yaml file")
            raise ConfigError(f"unknown spec '{text}'; {hint}")
        path = shipped[text]
    return parse_spec(read_yaml(path), default_name=path.stem, base_dir=path.parent, plugins=plugins)


def parse_spec(
    raw: dict[str, Any],
    *,
    default_name: str = "experiment",
    base_dir: Path | None = None,
    plugins: list[str] | tuple[str, ...] = (),
) -> Spec:
    from fuselab.plugins import load_plugin

    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"unknown spec key '{unknown[0]}'; allowed: {', '.join(SPEC_KEYS)}")
    listed = raw.get("plugins") or []
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise ConfigError("spec key 'plugins' must be a list of .py paths or module names")
    loaded = [load_plugin(p) for p in plugins] + [load_plugin(p, base=base_dir) for p in listed]
    resolved = [_plugin_key(p, base_dir) for p in [*plugins, *listed]]
    del loaded
    name = check_experiment_name(str(raw.get("name") or default_name))
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError("spec key 'base' must be a mapping of config sections")
    methods = _methods(raw, name)
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError("spec key 'seeds' must be a non-empty list of integers (or a count)")
    for method in methods:  # every grid key and override must be a config key, before anything else
        try:
            apply_overrides(base, method.overrides)
        except ConfigError as exc:
            raise ConfigError(f"spec '{name}', method '{method.name}': {exc}") from None
    metric = str(raw.get("metric", "accuracy"))
    if metric not in METRICS:
        raise ConfigError(f"spec key 'metric' must be one of {', '.join(METRICS)}, got '{metric}'")
    baseline = _resolve_baseline(raw.get("baseline"), methods, name)
    spec = Spec(name, base, methods, list(seeds), baseline, metric, str(raw.get("description", "")), raw, resolved,
                **_fairness_options(raw, name), evaluate=_evaluate_sets(raw.get("evaluate"), base, methods, name))
    if spec.search:
        check_space(spec)  # every search key must be a config key of at least one method
    return spec


def _methods(raw: dict[str, Any], name: str) -> list[Method]:
    """The methods of a spec: one per combination of its grid, then its named variants (or ``base`` alone),
    with safe and distinct names."""
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError("spec key 'grid' must map dotted config keys to non-empty lists of values")
    methods: list[Method] = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)) if keys else ():
        overrides = dict(zip(keys, values))
        label = str(values[0]) if len(keys) == 1 else ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items())
        methods.append(Method(label, overrides))
    for i, variant in enumerate(raw.get("variants") or []):
        if not isinstance(variant, dict) or not variant.get("name"):
            raise ConfigError(f"spec variant {i + 1} has no name; give each variant a 'name:' key")
        body = {k: v for k, v in variant.items() if k != "name"}
        methods.append(Method(str(variant["name"]), _flatten("", body) if body else {}))
    if not methods:
        methods.append(Method("base", {}))
    names = [check_method_name(m.name, name) for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"spec '{name}' has two methods named '{duplicates[0]}'; rename a variant")
    return methods


def _evaluate_sets(raw: Any, base: dict[str, Any], methods: list[Method], name: str) -> dict[str, dict[str, Any]]:
    """The spec's ``evaluate:`` section, checked: names safe as file names, each set a mapping of dotted
    config keys (nested sections are flattened) that gives a valid config over every method."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"spec '{name}': key 'evaluate' must map test set names to overrides, e.g. "
                          "evaluate: {other-scene: {data.images: [a.hdr, b.hdr]}}")
    sets: dict[str, dict[str, Any]] = {}
    for label, body in raw.items():
        label = str(label)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,99}", label):
            raise ConfigError(f"spec '{name}': evaluate set name {label!r} must be letters, digits, '.', '_', '=', '-' "
                              "(up to 100, starting with a letter or digit)")
        if not isinstance(body, dict) or not body:
            raise ConfigError(f"spec '{name}': evaluate set '{label}' must be a non-empty mapping of dotted config keys "
                              "to values, e.g. {data.test_fraction: 0.3}")
        overrides = _flatten("", body)
        for method in methods:
            try:
                apply_overrides(base, {**method.overrides, **overrides})
            except ConfigError as exc:
                raise ConfigError(f"spec '{name}', evaluate set '{label}' (method '{method.name}'): {exc}") from None
        sets[label] = overrides
    return sets


def check_experiment_name(name: str) -> str:
    """An experiment name is a folder name in the store (``<store>/<name>/report``): letters, digits and
    ``. _ - +`` (and spaces), starting with a letter or digit; never a path."""
    if (not name or len(name) > 128 or not name[0].isalnum() or ".." in name
            or not all(c.isalnum() or c in "._-+ " for c in name)):
        raise ConfigError(f"experiment name {name!r} is not a safe folder name; use letters, digits and . _ - + "
                          "(no '/', '\\' or '..'), e.g. name: my-compare")
    return name


def check_method_name(method: str, spec_name: str) -> str:
    """A method name is a label (``image-only/clean`` is fine), but never a path that could leave the store:
    not absolute, no ``..`` part, no backslash or control characters."""
    parts = method.split("/")
    if (not method or len(method) > 200 or method.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or "\\" in method or any(not c.isprintable() for c in method)):
        raise ConfigError(f"spec '{spec_name}': method name {method!r} is not a safe label; use letters, digits, "
                          "- _ . and '/' between words (not absolute, no '..' or '\\')")
    return method


def _fairness_options(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """The tuning and fair-comparison keys of a spec, checked."""
    search = raw.get("search") or {}
    parse_space(search)  # raises a ConfigError naming the bad entry
    direction = str(raw.get("direction", "maximize"))
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"spec key 'direction' must be maximize or minimize, got '{direction}'")
    budget = str(raw.get("budget", "equal-epochs"))
    if budget not in BUDGETS:
        raise ConfigError(f"spec key 'budget' must be one of {', '.join(BUDGETS)}, got '{budget}'")
    if budget == "equal-trials" and not search:
        raise ConfigError(f"spec '{name}' has budget equal-trials but no search block; add e.g. "
                          "search: {train.lr: {loguniform: [1.0e-4, 1.0e-2]}}")
    match_params = raw.get("match_params", False)
    if not isinstance(match_params, bool):
        raise ConfigError(f"spec key 'match_params' must be true or false, got {match_params!r}")
    trials = raw.get("trials", 20)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"spec key 'trials' must be a positive integer, got {trials!r}")
    return {"search": search, "direction": direction, "budget": budget, "match_params": match_params, "trials": trials}


def _plugin_key(source: str, base_dir: Path | None) -> str:
    """A plugin as a worker process can load it: an absolute path, or the module name."""
    path = Path(source).expanduser()
    if source.endswith(".py") or "/" in source or path.exists():
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        return str(path.resolve())
    return source


def _resolve_baseline(baseline: Any, methods: list[Method], spec_name: str) -> str:
    if baseline is None:
        return methods[0].name
    if isinstance(baseline, str):
        for m in methods:
            if m.name == baseline:
                return m.name
    elif isinstance(baseline, dict):
        wanted = _flatten("", baseline)
        for m in methods:
            if all(m.overrides.get(k) == v for k, v in wanted.items()) and m.overrides:
                return m.name
    raise ConfigError(
        f"spec '{spec_name}': baseline {baseline!r} matches no method; methods are: {', '.join(m.name for m in methods)}"
    )
