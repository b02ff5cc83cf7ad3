"""Forward FLOPs per sample of a run's model, counted in one place: when a run finishes (``record_flops``)
and when a report needs a count a run folder lacks (``cached_flops``); both write ``<run>/flops.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fuselab.train.config import make_config
from fuselab.train.session import build_data, build_model, cached_data, rebuildable

COUNTER = {"counter": "torch.utils.flop_counter", "mode": "eval"}
_COUNTED: dict[str, float | None] = {}  # FLOPs per sample per model config, counted once per process


def _config(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else make_config(dict(cfg))


def flops_per_sample(cfg: Any, data: Any = None, *, batch: int = 8) -> float:
    """Forward FLOPs per sample of the model a run config describes (eval mode, one test batch).

    ``cfg`` is a resolved run config (``DictConfig`` or a plain dict); ``data`` its ``DataBundle`` if
    already built. Attention through SDPA is counted (``fuselab.layers.attention`` registers its formula).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import fuselab.layers.attention  # noqa: F401  (registers the SDPA FLOP formula)

    cfg = _config(cfg)
    data = data if data is not None else build_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, data).eval()
    n = min(batch, len(data.test))
    inputs, _ = data.test.take(torch.arange(n))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(inputs)
    return counter.get_total_flops() / n


def write_flops(run_dir: str | Path, flops: float) -> None:
    """``<run_dir>/flops.json`` (atomically); a read-only folder is left as it is."""
    file = Path(run_dir) / "flops.json"
    try:
        tmp = file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"flops_per_sample": flops, **COUNTER}))
        tmp.replace(file)
    except OSError:  # a read-only store still gets its plot
        pass


def record_flops(cfg: Any, run_dir: Any = None) -> float | None:
    """FLOPs per sample of a finished run's model, counted once per model config in this process and
    written to ``<run_dir>/flops.json`` and its ``metrics.json``; None when the model cannot be counted
    (a run never fails for it)."""
    cfg = _config(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    key = json.dumps({k: container.get(k) for k in ("data", "model", "fusion", "exchange", "loss")}, sort_keys=True, default=str)
    if key not in _COUNTED:
        try:
            _COUNTED[key] = float(flops_per_sample(cfg, cached_data(cfg)))
        except Exception:  # noqa: BLE001 - a model the counter cannot trace still trains and reports
            _COUNTED[key] = None
    flops = _COUNTED[key]
    if run_dir is not None and flops is not None:
        folder = Path(run_dir)
        write_flops(folder, flops)
        metrics_file = folder / "metrics.json"
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            metrics["flops"] = flops
            metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    return flops


def cached_flops(run_dir: str | Path, cfg: Any = None, *, compute: bool = True) -> float | None:
    """FLOPs per sample of a finished run, from ``<run_dir>/flops.json`` or its ``metrics.json``, else
    counted and stored there (only when ``compute`` and the stored config names registered ids and no
    import path: a report never runs what a stored config names). Datasets come from the process cache."""
    run_dir = Path(run_dir)
    file = run_dir / "flops.json"
    if file.is_file():
        try:
            return float(json.loads(file.read_text())["flops_per_sample"])
        except (ValueError, KeyError, TypeError):
            pass
    try:  # counted when the run trained
        recorded = json.loads((run_dir / "metrics.json").read_text()).get("flops")
        if recorded is not None:
            return float(recorded)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    if not compute:
        return None
    if cfg is None:
        if not (run_dir / "config.yaml").is_file():
            return None
        cfg = make_config(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True))
    cfg = _config(cfg)
    if not rebuildable(cfg):
        return None
    flops = flops_per_sample(cfg, cached_data(cfg))
    write_flops(run_dir, flops)
    return flops


__all__ = ["cached_flops", "flops_per_sample", "record_flops", "write_flops"]
