"""The run-session layer: everything between a resolved run config and a model ready to train or to use.

``prepare_run(cfg)`` does what every command that trains or evaluates needs first (torch threads, flush
denormals, Lightning Fabric, the seed, the dataset through one process-wide cache, the model and the loss with
their build errors turned into one-line ``ConfigError`` s). ``load_run(run_dir)`` gives a finished run back:
its config, the dataset it describes and the trained model of every fold in eval mode, with ``predict`` for a
batch and a fold-ensemble prediction.

``fuselab run`` / ``compare`` (``train.run.execute``), tuning, parameter matching, FLOP counting and the
robustness evaluation all start here, so a change to the run setup is made once.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fuselab.data.core import DataBundle, ModalTensors
from fuselab.errors import ConfigError
from fuselab.train.config import TrainConfig, make_config, section

if TYPE_CHECKING:  # Lightning Fabric is imported by the run that trains (train.loop), not by readers of runs
    from lightning_fabric import Fabric

DATA_CACHE_SIZE = 2  # datasets kept per process (a sweep's runs share one; a spec rarely names more than two)
_DATA: dict[str, DataBundle] = {}


def setup_process(threads: int | None = None) -> None:
    """Torch's process-wide settings for a run: intra-op ``threads`` (None keeps torch's default) and
    flushing of denormal floats (products of many small factors must not fall into slow subnormals; a
    re-evaluation must reproduce training's numbers bit for bit)."""
    if threads:
        torch.set_num_threads(int(threads))
    torch.set_flush_denormal(True)


def data_key(cfg: DictConfig) -> str:
    """What a dataset depends on: its config section and the seed (which fixes the split)."""
    return json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True, default=str) + f"|{int(cfg.seed)}"


def build_data(cfg: DictConfig) -> DataBundle:
    """The dataset a run config describes, built fresh."""
    from fuselab.registry import DATASETS

    options = section(cfg, "data")
    name = options.pop("name")
    return DATASETS.get(name)(seed=int(cfg.seed), **options)


def cached_data(cfg: DictConfig) -> DataBundle:
    """The dataset of ``cfg`` from the process-wide cache (built on first use; the oldest of more than
    :data:`DATA_CACHE_SIZE` is dropped). Callers must not modify it in place."""
    key = data_key(cfg)
    if key not in _DATA:
        while len(_DATA) >= DATA_CACHE_SIZE:
            _DATA.pop(next(iter(_DATA)))
        _DATA[key] = build_data(cfg)
    return _DATA[key]


def clear_data_cache() -> None:
    _DATA.clear()


def build_model(cfg: DictConfig, data: DataBundle) -> nn.Module:
    """The model of a run config for a dataset (``data.dims``, ``num_classes``, task), unchecked errors
    included; see :func:`build_checked_model` for the one-line user errors."""
    import inspect

    from fuselab.registry import MODELS

    options = section(cfg, "model")
    name = options.pop("name")
    if any(t["name"] == "aux-unimodal" for t in section(cfg, "loss")["terms"]):
        options.setdefault("modality_heads", True)
    exchange = section(cfg, "exchange") if "exchange" in cfg else {}
    if exchange:
        options["exchange"] = exchange
    builder = MODELS.get(name)
    if data.task != "classification" and "dense" in inspect.signature(builder).parameters:
        options.setdefault("dense", True)  # per-pixel logits for the dense tasks
    if "example" in inspect.signature(builder).parameters:  # builders that measure their encoders' outputs
        options["example"] = data.train.take(torch.arange(min(2, len(data.train))))[0]
    model = builder(dims=data.dims, num_classes=data.num_classes, fusion=section(cfg, "fusion"), **options)
    terms = {t["name"] for t in section(cfg, "loss")["terms"]}
    needed = [t for t in getattr(model, "required_loss_terms", ()) if t not in terms]
    if needed:  # e.g. CEN: each stream is trained only by its own head's loss
        raise ConfigError(f"model {name} needs loss term '{needed[0]}' (each stream learns from its own head); add it, "
                          f"e.g. loss.terms='[{{name: ce}}, {{name: {needed[0]}}}]'")
    return model


def build_checked_model(cfg: DictConfig, data: DataBundle) -> nn.Module:
    """:func:`build_model`, with a shape or option problem found while building reported as one line."""
    try:
        return build_model(cfg, data)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def build_loss(cfg: DictConfig) -> nn.Module:
    from fuselab.losses import WeightedLoss

    try:
        return WeightedLoss(section(cfg, "loss")["terms"])
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


@dataclasses.dataclass
class RunSession:
    """A prepared run: its config, training options, Fabric (seeded) and dataset."""

    cfg: DictConfig
    train: TrainConfig
    fabric: Fabric
    data: DataBundle

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def parts(self) -> list[DataBundle]:
        """The folds of a cross-validated dataset (one model each), else the dataset itself."""
        return list(self.data.folds or [self.data])

    def reseed(self) -> None:
        """Seed everything again (every fold starts from the same initialisation)."""
        self.fabric.seed_everything(self.seed, verbose=False)

    def model(self, part: DataBundle | None = None) -> nn.Module:
        return build_checked_model(self.cfg, self.data if part is None else part)

    def loss(self) -> nn.Module:
        return build_loss(self.cfg)


def prepare_run(cfg: DictConfig, *, loggers: Sequence[Any] = (), data: DataBundle | None = None,
                cache: bool = False, launch: bool = False) -> RunSession:
    """Set up one run of ``cfg``: threads and denormals (:func:`setup_process`), Lightning Fabric with
    ``loggers``, the seed, and the dataset (``data`` when given, else from the process cache with ``cache``,
    else built fresh). ``launch`` starts the other processes of a multi-device run."""
    from fuselab.train.loop import make_fabric

    tcfg = OmegaConf.to_object(cfg.train)
    setup_process(tcfg.threads)
    fabric = make_fabric(tcfg, list(loggers))
    if launch and fabric.world_size > 1:
        fabric.launch()  # starts the other processes, unless torchrun or SLURM already did
    fabric.seed_everything(int(cfg.seed), verbose=False)
    if data is None:
        data = cached_data(cfg) if cache else build_data(cfg)
    return RunSession(cfg, tcfg, fabric, data)


# ----------------------------------------------------------------------------------------------
# finished runs
# ----------------------------------------------------------------------------------------------


def fold_state(state: dict[str, Tensor], fold: int, folds: int) -> dict[str, Tensor]:
    """The weights of one fold from a run's checkpoint (a cross-validated run keeps ``fold<i>/`` keys)."""
    if folds <= 1:
        return state
    prefix = f"fold{fold}/"
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def rebuildable(cfg: Any) -> bool:
    """May a stored config be rebuilt into a model without the user asking for it? Only when the dataset,
    model and fusion are registered ids and nothing in it is an import path (``custom-streams`` encoders
    name arbitrary classes): a stored config in a shared store is data, never code to run."""
    from fuselab.registry import DATASETS, FUSIONS, MODELS

    container = OmegaConf.to_container(cfg, resolve=True) if hasattr(cfg, "_get_node") else dict(cfg)

    def has_target(value: Any) -> bool:
        if isinstance(value, dict):
            return "target" in value or any(has_target(v) for v in value.values())
        if isinstance(value, list):
            return any(has_target(v) for v in value)
        return False

    names = [(DATASETS, (container.get("data") or {}).get("name")), (MODELS, (container.get("model") or {}).get("name")),
             (FUSIONS, (container.get("fusion") or {}).get("name"))]
    registered = all(name is None or name in registry.list() for registry, name in names)
    return registered and not has_target(container.get("model"))


def read_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config of a finished run (its ``config.yaml``), with dotted ``overrides`` on top."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run folder (no config.yaml); give a folder that `fuselab run` wrote")
    return make_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True), list(overrides))


@dataclasses.dataclass
class LoadedRun:
    """A finished run, ready to use: ``models`` holds the trained model of every fold (one without
    cross-validation), in eval mode on ``device``."""

    path: Path
    config: DictConfig
    data: DataBundle
    models: list[nn.Module]
    metrics: dict[str, Any]
    device: torch.device

    @property
    def model(self) -> nn.Module:
        """The model of the first (or only) fold."""
        return self.models[0]

    @torch.no_grad()
    def logits(self, x: dict[str, Tensor], *, fold: int | None = None, batch_size: int | None = None) -> Tensor:
        """Logits of a batch of inputs (``{modality: tensor}``) from one fold's model, or the mean of every
        fold's logits (``fold=None``). They run in the run's ``train.precision`` (autocast for the mixed ones)
        and memory format (``train.channels_last``), as its evaluation did."""
        from fuselab.train.loop import predict, split_to_device

        batch_size = int(batch_size or self.config.train.eval_batch_size)
        n = len(next(iter(x.values())))
        split = split_to_device(ModalTensors(dict(x), torch.zeros(n, dtype=torch.long)), self.device,
                                channels_last=bool(self.config.train.get("channels_last", False)))
        chosen = self.models if fold is None else [self.models[fold]]
        precision = str(self.config.train.get("precision", "32-true"))
        return torch.stack([predict(model, split, batch_size, precision=precision).float() for model in chosen]).mean(0)

    @torch.no_grad()
    def predict_proba(self, x: dict[str, Tensor], *, fold: int | None = None) -> Tensor:
        """Class probabilities (softmax over the class axis, dim 1), averaged over the folds unless ``fold``."""
        probs = [torch.softmax(self.logits(x, fold=i), dim=1) for i in ([fold] if fold is not None else range(len(self.models)))]
        return torch.stack(probs).mean(0)

    def predict(self, x: dict[str, Tensor], *, fold: int | None = None) -> Tensor:
        """Predicted classes (per sample, or per pixel for dense tasks) of the fold ensemble, or of ``fold``."""
        return self.predict_proba(x, fold=fold).argmax(1)


def load_run(run_dir: str | Path, overrides: Sequence[str] = (), *, data: DataBundle | None = None,
             device: str | torch.device = "cpu", trust: bool = False) -> LoadedRun:
    """A finished run folder as a :class:`LoadedRun`: its config (``overrides`` on top, e.g. another data
    section), the dataset that config describes (or ``data``), and every fold's trained weights from
    ``checkpoint.pt`` (loaded with ``weights_only``: never runs code).

    A config that names import paths (``custom-streams`` encoders) is rebuilt only with ``trust=True``.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir, overrides)
    if not trust and not rebuildable(cfg):
        raise ConfigError(f"run '{run_dir}' names an import path or an unregistered id in its config; "
                          "load it with trust=True only if you trust the store")
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        raise ConfigError(f"run '{run_dir}' has no checkpoint.pt (it trained with train.checkpoint=false); "
                          "train it again with train.checkpoint=true")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    setup_process()
    data = data if data is not None else build_data(cfg)
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    folds = len({k.split("/", 1)[0] for k in state if re.match(r"fold\d+/", k)}) or 1
    parts = list(data.folds or [data]) if folds > 1 else [data]
    if folds > 1 and len(parts) != folds:
        parts = [data] * folds  # new data without folds: every fold's model sees all of it
    device = torch.device(device)
    models = []
    for i in range(folds):
        torch.manual_seed(int(cfg.seed))
        model = build_checked_model(cfg, parts[i])
        model.load_state_dict(fold_state(state, i, folds))
        if cfg.train.get("channels_last", False):
            model = model.to(memory_format=torch.channels_last)
        models.append(model.to(device).eval())
    return LoadedRun(run_dir, cfg, data, models, metrics, device)


def load_run_on(run_dir: str | Path, overrides: Sequence[str] = (), **options: Any) -> LoadedRun:
    """:func:`load_run` for other data than the run trained on (``overrides`` of its data section): weights
    that do not fit the model the new data describes (other modalities or widths) are one ``ConfigError`` line."""
    try:
        return load_run(run_dir, overrides, **options)
    except RuntimeError as exc:
        if "state_dict" not in str(exc):
            raise
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), "")[:160]
        raise ConfigError(f"run '{Path(run_dir).name}' does not fit this data: the model it describes differs from the "
                          f"trained one ({detail}); give data with the modalities and widths the run trained on") from None


__all__ = [
    "DATA_CACHE_SIZE", "LoadedRun", "RunSession", "build_checked_model", "build_data", "build_loss", "build_model",
    "cached_data", "clear_data_cache", "data_key", "fold_state", "load_run", "load_run_on", "prepare_run", "read_run_config",
    "rebuildable", "setup_process",
]
