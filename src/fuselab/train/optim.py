"""Optimiser construction, weight-decay groups, batch-norm freezing and proximal steps.

Nothing here knows about fusion. Modules take part through two optional, generic attributes:

- ``no_weight_decay``: a tuple of names of the module's own parameters that get no weight decay when
  ``train.no_decay_norm_bias`` is on (e.g. the ensemble weights of a learned softmax mix), besides every
  parameter of a normalisation layer and every parameter named ``bias``;
- ``proximal_step(lr)``: called after each optimiser step with the learning rate that step used, for a
  penalty applied as a proximal operator instead of a loss term (CEN's L1 on BN scales, soft-thresholded
  to exact zeros).

The SGD recipe matches the official CEN training (yikaiw/CEN ``semantic_segmentation/main.py``:
``torch.optim.SGD(params, lr, momentum=0.9, weight_decay=1e-5)``, batch norms put in ``eval()`` at the
start of every epoch when ``freeze_bn``, so they normalise with their running statistics, which no longer
update, while their scales and shifts still receive gradients).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# layers whose parameters are scales and shifts of a normalisation (BatchNorm*, InstanceNorm*, LayerNorm, ...)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                           nn.LocalResponseNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def no_decay_names(model: nn.Module) -> set[str]:
    """Qualified names of the parameters that get no weight decay: every parameter of a normalisation layer,
    every parameter named ``bias``, and those a module lists in its ``no_weight_decay`` (ensemble weights)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = set(getattr(module, "no_weight_decay", ()))
        for name, _ in module.named_parameters(recurse=False):
            if isinstance(module, NORM_TYPES) or name == "bias" or name in listed:
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: the decayed parameters at ``weight_decay``, and the norms / biases / ensemble weights at 0
    (an empty group is left out)."""
    skip = no_decay_names(model)
    decay = [p for n, p in model.named_parameters() if n not in skip]
    plain = [p for n, p in model.named_parameters() if n in skip]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: Any, *, fused: bool = False) -> torch.optim.Optimizer:
    """The optimiser of ``cfg.optimizer`` (adamw | adam | sgd) over ``model``'s parameters.

    With ``cfg.no_decay_norm_bias`` the parameters are split into a decayed and a non-decayed group
    (``parameter_groups``); otherwise every parameter is decayed at ``cfg.weight_decay``, as before the
    option existed (same parameter order, so runs are unchanged). ``fused`` picks the one-kernel
    implementation of Adam / AdamW (CPU and CUDA)."""
    params: Iterable[Any] = (parameter_groups(model, cfg.weight_decay) if cfg.no_decay_norm_bias
                             else model.parameters())
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer must be adamw, adam or sgd, got {cfg.optimizer!r}")


def freeze_batch_norms(model: nn.Module) -> int:
    """Put every batch norm in evaluation mode: it normalises with its running statistics and stops updating
    them, while its scale and shift still learn (call after ``model.train()``). Returns how many."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    return len(norms)


def proximal_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that define ``proximal_step(lr)``, in module order."""
    return [m for m in model.modules() if callable(getattr(m, "proximal_step", None))]


def proximal_steps(modules: Iterable[nn.Module], lr: float) -> None:
    """Each module's proximal step for the learning rate the optimiser step just used."""
    for m in modules:
        m.proximal_step(lr)


__all__ = ["NORM_TYPES", "freeze_batch_norms", "make_optimizer", "no_decay_names", "parameter_groups",
           "proximal_modules", "proximal_steps"]
