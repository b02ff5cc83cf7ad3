"""fuselab: a PyTorch workbench for multimodal-fusion research."""

from typing import Any

import fuselab.data  # noqa: F401  (registers the built-in datasets)
import fuselab.losses  # noqa: F401  (registers the built-in loss terms)
import fuselab.models  # noqa: F401  (registers the built-in models)
from fuselab.api import create_fusion, fusion_info, list_fusions
from fuselab.errors import ConfigError
from fuselab.models.diagnostics import cross_modal_gradients, fusion_diagnostics, modality_dependence
from fuselab.registry import (
    DATASETS,
    FUSIONS,
    LOSSES,
    MODELS,
    Registry,
    register_dataset,
    register_fusion,
    register_loss,
    register_model,
)

__version__ = "0.1.0"

# the store and run layers load on first use: ``import fuselab`` stays at the operators, models and data
_LAZY = {"load_results": "fuselab.experiments.results", "load_run": "fuselab.train.session"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fuselab' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DATASETS",
    "FUSIONS",
    "LOSSES",
    "MODELS",
    "Registry",
    "create_fusion",
    "cross_modal_gradients",
    "fusion_diagnostics",
    "fusion_info",
    "list_fusions",
    "load_results",
    "load_run",
    "modality_dependence",
    "register_dataset",
    "register_fusion",
    "register_loss",
    "register_model",
]
