"""Run configuration: typed dataclasses with OmegaConf, YAML files plus dotted overrides.

The ``data``, ``model`` and ``fusion`` sections hold the options of a registered dataset, model or fusion
(each has its own), so they are checked against that entry's signature instead of a fixed dataclass.
Every problem is a ``ConfigError``: one line naming the key path and what is allowed.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import fuselab.data  # noqa: F401  (registers datasets)
import fuselab.losses  # noqa: F401  (registers loss terms)
import fuselab.models  # noqa: F401  (registers models)
from fuselab.errors import ConfigError
from fuselab.registry import DATASETS, FUSIONS, LOSSES, MODELS


# what Lightning Fabric accepts as ``precision`` (16-mixed on a CPU falls back to bf16-mixed, with a warning)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "16", "bf16", "64",
              "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps", "tpu")  # Lightning Fabric's accelerator names


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 60  # passes over the training split
    batch_size: int = 64  # samples per optimiser step
    last_batch: str = "keep"  # keep | merge: "merge" adds a lone last training sample to the batch before it (batch norm cannot train on a batch of one); "keep" leaves it alone, as PyTorch's DataLoader does
    lr: float = 1.0e-3  # peak learning rate of the optimiser
    weight_decay: float = 1.0e-2  # decoupled for adamw, added to the gradient (L2) for adam and sgd
    optimizer: str = "adamw"  # adamw | adam | sgd (CEN's official recipe: sgd, momentum 0.9, weight_decay 1e-5)
    momentum: float = 0.9  # sgd only: momentum factor (0 = plain SGD)
    nesterov: bool = False  # sgd only: Nesterov momentum (needs momentum > 0)
    no_decay_norm_bias: bool = False  # no weight decay on norm scales / shifts, biases and ensemble weights
    freeze_bn: bool = False  # batch norms normalise with their running statistics, which stop updating; scales and shifts still learn (CEN's official code)
    freeze_bn_epoch: int = 0  # with freeze_bn: first epoch with frozen batch norms (earlier ones estimate the statistics of a network trained from scratch)
    warmup: float = 0.05  # share of all steps with a linear warm-up, then cosine decay to zero
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    patience: int = 0  # early stopping after this many epochs without validation gain; 0 = never
    monitor: str = "accuracy"  # validation metric that picks the best checkpoint: accuracy | macro_f1 | loss
    select: str = "best"  # evaluate on test the best epoch on validation ("best") or the final weights ("last")
    precision: str = "32-true"  # Lightning Fabric precision: 32-true, bf16-mixed, 16-mixed, ...
    channels_last: bool = False  # models and 4-D (map) inputs in channels_last memory format (faster convolutions on GPUs with tensor cores); the same results up to float rounding
    compile: bool = False  # torch.compile the training forward pass (the first steps pay the compilation; evaluation stays eager); the same results up to float rounding, except that compiled dropout draws other masks
    accelerator: str = "auto"  # cpu | cuda | mps | auto
    devices: int = 1  # devices (processes) per node for one run; > 1 is data-parallel (launch with fuselab run)
    num_nodes: int = 1  # nodes for one run (torchrun or SLURM launches the processes)
    strategy: str = "auto"  # Lightning Fabric strategy: auto, ddp, ddp_spawn, fsdp, ...
    threads: Optional[int] = None  # torch intra-op threads for this run; None keeps torch's default
    eval_batch_size: int = 1024  # samples per forward pass in validation and test
    tensorboard: bool = False  # also write TensorBoard event files (CSV logs are always written)
    logger: Any = "csv"  # experiment trackers: csv (always written), mlflow, tensorboard, or a list such as [csv, mlflow]
    mlflow_uri: Optional[str] = None  # MLflow tracking URI (sqlite:///..., http://host:5000); None = mlflow.db in the run folder, or in the result store for its runs
    checkpoint: bool = True  # save the best-on-validation weights in the run folder
    checkpoint_every: float = 30.0  # seconds between resumable training states in a run under a store
    modality_dropout: Any = 0.0  # per training sample, the probability of dropping each modality (its stream is zeroed at the encoder's output, so a dropped encoder gets no gradient): one number for every modality or {modality: probability}; 0 = off


@dataclasses.dataclass
class LossConfig:
    terms: list[dict[str, Any]] = dataclasses.field(default_factory=lambda: [{"name": "ce", "weight": 1.0}])  # weighted terms


@dataclasses.dataclass
class RunConfig:
    data: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "mfeat"})
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "mlp-streams"})
    fusion: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "concat"})
    # optional Exchange operator (bottleneck, joint-attention, cross-attention, ...); empty = the model's own
    # default; only builders with an ``exchange`` parameter (mbt) take one
    exchange: dict[str, Any] = dataclasses.field(default_factory=dict)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    seed: int = 0  # fixes the data split, the initialisation and the batch order
    # a deliberate control: a configuration that cannot carry information between modalities (e.g. CEN without
    # exchange) is allowed instead of rejected, and the report labels its row as a control
    control: bool = False


SECTIONS = [f.name for f in dataclasses.fields(RunConfig)]
# keys a builder receives from fuselab itself, never from the config
_INJECTED = {
    "data": {"seed"},
    "model": {"dims", "num_classes", "fusion", "exchange", "example"},
    "fusion": {"dims", "layers"},
    "exchange": {"dims", "layers"},
}


def _omegaconf_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    msg = str(exc).splitlines()[0]
    if "not in" in msg or "Key" in msg and "not" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _allowed(parent)
        return ConfigError(f"unknown config key '{key}'" + (f"; allowed: {', '.join(allowed)}" if allowed else ""))
    return ConfigError(f"config key '{key}': {msg}")


def _allowed(section: str) -> list[str]:
    node: Any = RunConfig
    for part in filter(None, section.split(".")):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return []
        node = typing.get_type_hints(node)[part]
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with one-line errors for a missing file or invalid YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"'{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"'{path}' is not valid YAML{where}: {problem}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"'{path}' must hold a mapping of config sections, got {type(content).__name__}")
    return content


def make_config(base: dict[str, Any] | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved run config: defaults <- ``base`` <- dotted ``overrides`` (``train.epochs=20``), checked."""
    try:
        cfg = OmegaConf.structured(RunConfig)
        if base:
            unknown = sorted(set(base) - set(SECTIONS))
            if unknown:
                raise ConfigError(f"unknown config section '{unknown[0]}'; allowed: {', '.join(SECTIONS)}")
            cfg = _merge_sections(cfg, base)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like key=value, e.g. train.epochs=20")
            try:
                parsed = OmegaConf.from_dotlist([item])
            except yaml.YAMLError:
                raise ConfigError(f"override '{item}' has a value that is not valid YAML") from None
            cfg = _merge_sections(cfg, OmegaConf.to_container(parsed))
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc) from None
    validate(cfg)
    return cfg


def dot_value(value: Any) -> str:
    """A value as OmegaConf's dotlist parser reads it back (lists and dicts as YAML flow)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def apply_overrides(base: dict[str, Any] | None, overrides: Mapping[str, Any] | None = None, *,
                    seed: int | None = None) -> DictConfig:
    """The resolved run config of ``base`` with dotted ``overrides`` (``{"fusion.name": "sum"}``, values of any
    type) and, when given, ``seed``: the one way every spec, tuning and matching step builds a run config."""
    items = [f"{k}={dot_value(v)}" for k, v in (overrides or {}).items()]
    if seed is not None:
        items.append(f"seed={int(seed)}")
    return make_config(base, items)


def _merge_sections(cfg: DictConfig, update: dict[str, Any]) -> DictConfig:
    unknown = sorted(set(update) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section '{unknown[0]}'; allowed: {', '.join(SECTIONS)}")
    for section in ("data", "model", "fusion", "exchange"):
        # switching to another registered entry drops the previous entry's options
        new = update.get(section)
        if isinstance(new, dict) and "name" in new and new["name"] != (cfg[section] or {}).get("name"):
            cfg[section] = {}
    return OmegaConf.merge(cfg, update)


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, Sequence, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, typing.Mapping) or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_options(section: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    """Check a section's options against a registered factory's keyword parameters and their types."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable hints only weaken the type check
        hints = {}
    injected = {"self", *_INJECTED.get(section, ())}
    allowed = [n for n, p in params.items() if n not in injected and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key, value in options.items():
        if key == "name":
            continue
        if key not in allowed:
            raise ConfigError(
                f"unknown config key '{section}.{key}'; allowed: {', '.join(['name', *allowed]) or 'name'}"
            )
        hint = hints.get(key, inspect.Parameter.empty)
        if value is not None and not _type_ok(value, hint):
            raise ConfigError(f"config key '{section}.{key}' must be {_type_name(hint)}, got {value!r}")


def fusion_problem(data: dict[str, Any], model: dict[str, Any], exchange: dict[str, Any],
                   fusion: dict[str, Any]) -> str | None:
    """One line when a config's fusion cannot carry information between modalities, from the model builder's
    ``fusion_problem`` and the operators' ``FusionBase.fusion_problem``; None when it can, or when the data
    has one modality (a unimodal baseline fuses nothing by design)."""
    chosen = data.get("modalities") or data.get("views")
    if isinstance(chosen, list) and len(chosen) == 1:
        return None
    check = getattr(MODELS.get(model["name"]), "fusion_problem", None)
    problem = check(model, exchange) if check is not None else None
    for options in (exchange, fusion):
        op_check = getattr(FUSIONS.get(options["name"]), "fusion_problem", None) if options.get("name") in FUSIONS else None
        if problem is None and op_check is not None:
            problem = op_check(options)
    return problem


def validate(cfg: DictConfig) -> None:
    """Check names and options of every free-form section before anything runs."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    fusion = OmegaConf.to_container(cfg.fusion, resolve=True)
    for section, registry, options in (("data", DATASETS, data), ("model", MODELS, model), ("fusion", FUSIONS, fusion)):
        if "name" not in options:
            raise ConfigError(f"config section '{section}' needs a name, e.g. {section}.name=...")
        if options["name"] not in registry:
            raise ConfigError(registry.unknown_message(options["name"]))
        check_options(section, registry.get(options["name"]), options)
    model_check = getattr(MODELS.get(model["name"]), "check_config", None)  # options that need each other
    if model_check is not None:
        try:
            model_check(model)
        except ValueError as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
    for i, term in enumerate(OmegaConf.to_container(cfg.loss.terms, resolve=True)):
        if not isinstance(term, dict) or "name" not in term:
            raise ConfigError(f"loss.terms[{i}] needs a name, e.g. {{name: ce, weight: 1.0}}")
        if term["name"] not in LOSSES:
            raise ConfigError(LOSSES.unknown_message(term["name"]))
        check_options(f"loss.terms[{i}]", LOSSES.get(term["name"]), {k: v for k, v in term.items() if k != "weight"})
    exchange = OmegaConf.to_container(cfg.exchange, resolve=True)
    if exchange:
        if "name" not in exchange:
            raise ConfigError("config section 'exchange' needs a name, e.g. exchange.name=bottleneck")
        if exchange["name"] not in FUSIONS:
            raise ConfigError(FUSIONS.unknown_message(exchange["name"]))
        if FUSIONS.get(exchange["name"]).contract != "exchange":
            raise ConfigError(f"exchange.name '{exchange['name']}' is a merge; put it in the fusion section")
        if "exchange" not in inspect.signature(MODELS.get(model["name"])).parameters:
            raise ConfigError(f"model '{model['name']}' takes no exchange section; remove exchange.*")
        check_options("exchange", FUSIONS.get(exchange["name"]), exchange)
    problem = fusion_problem(OmegaConf.to_container(cfg.data, resolve=True), model, exchange, fusion)
    if problem and not cfg.control:
        raise ConfigError(f"{problem} (or set control=true to run it as a labelled control)")
    if cfg.train.monitor not in ("accuracy", "macro_f1", "loss"):
        raise ConfigError(f"config key 'train.monitor' must be accuracy, macro_f1 or loss, got {cfg.train.monitor!r}")
    if cfg.train.select not in ("best", "last"):
        raise ConfigError(f"config key 'train.select' must be best or last, got {cfg.train.select!r}")
    for key in ("epochs", "batch_size", "devices"):
        if cfg.train[key] < 1:
            raise ConfigError(f"config key 'train.{key}' must be at least 1, got {cfg.train[key]}")
    rates = cfg.train.modality_dropout
    rates = OmegaConf.to_container(rates, resolve=True) if isinstance(rates, DictConfig) else rates
    for name, rate in (rates.items() if isinstance(rates, dict) else [("", rates)]):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            key = "train.modality_dropout" + (f".{name}" if name else "")
            raise ConfigError(f"config key '{key}' must be a probability in [0, 1] (or a mapping of modality to one), got {rate!r}")
    if cfg.train.accelerator not in ACCELERATORS:
        raise ConfigError(f"config key 'train.accelerator' must be one of {', '.join(ACCELERATORS)}, got {cfg.train.accelerator!r}")
    if str(cfg.train.precision) not in PRECISIONS:
        raise ConfigError(f"config key 'train.precision' must be one of {', '.join(PRECISIONS)}, got {cfg.train.precision!r}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be positive, got {cfg.train.lr}")
    _check_optimizer(cfg.train)
    if cfg.train.last_batch not in ("keep", "merge"):
        raise ConfigError(f"config key 'train.last_batch' must be keep or merge, got {cfg.train.last_batch!r}")
    from fuselab.train.trackers import check_loggers

    check_loggers(cfg.train)


def _check_optimizer(train: Any) -> None:
    if train.optimizer not in ("adamw", "adam", "sgd"):
        raise ConfigError(f"config key 'train.optimizer' must be adamw, adam or sgd, got {train.optimizer!r}")
    if train.weight_decay < 0:
        raise ConfigError(f"config key 'train.weight_decay' must be >= 0, got {train.weight_decay}")
    if not 0 <= train.momentum < 1:
        raise ConfigError(f"config key 'train.momentum' must be in [0, 1), got {train.momentum}")
    if train.optimizer != "sgd" and train.momentum != 0.9:
        raise ConfigError(f"config key 'train.momentum' is used by train.optimizer=sgd only (got {train.optimizer})")
    if train.nesterov and (train.optimizer != "sgd" or train.momentum == 0):
        raise ConfigError("config key 'train.nesterov' needs train.optimizer=sgd and train.momentum > 0")
    if train.freeze_bn_epoch < 0:
        raise ConfigError(f"config key 'train.freeze_bn_epoch' must be >= 0, got {train.freeze_bn_epoch}")


def section(cfg: DictConfig, name: str) -> dict[str, Any]:
    """A config section as a plain dict."""
    return OmegaConf.to_container(cfg[name], resolve=True)  # type: ignore[return-value]

