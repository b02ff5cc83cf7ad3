"""fuselab: a PyTorch workbench for multimodal-fusion research."""

from fuselab.api import create_fusion, fusion_info, list_fusions
from fuselab.experiments.results import load_results
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

__all__ = [
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
    "modality_dependence",
    "register_dataset",
    "register_fusion",
    "register_loss",
    "register_model",
]
