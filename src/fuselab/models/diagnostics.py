"""Fusion diagnostics: does a model's prediction depend on every modality, and do its fusion operators carry
information between modalities?

Legend: b batch, m modality, k classes.

Two kinds of evidence, both cheap (a few forward passes on a fixed batch, no training):

- **Dependence** of the prediction on each modality: the mean total-variation distance between the model's
  predictive distribution on a batch and on the same batch with that modality's inputs permuted across the
  samples (every other modality left as it is). 0 means the prediction ignores the modality; 1 means the
  prediction changes completely. Permuting keeps the modality's own distribution (zeros or noise would be
  inputs the model never saw), so the measure reads "how much of what the model predicts comes from this
  modality of *this* sample". For dense outputs the distance is averaged over pixels. A single map sample
  (one scene, as in Landsat change detection) has nothing to permute across: it is cut into square tiles
  that take the samples' place, so a modality is swapped between places of the scene.
- **Operator state**: any module that defines ``fusion_stats(inputs) -> dict[str, float]`` reports what it
  did on the batch it received in the forward pass (the mean modality weights of an attention fusion, the
  share of attention MBT's modality tokens pay to the bottleneck tokens, the share of channels CEN
  exchanges, ...). A module whose class names a ``carry_stat`` says which of its statistics must be above
  zero for it to carry anything between modalities; at zero the run is marked as not fusing.

``cross_modal_gradients`` is the structural check used before training and in the tests: the gradient of
each modality's own output (its stream after the exchange, or its per-modality logits) with respect to the
other modalities' inputs. A configuration whose exchange has no such path fuses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

DEPENDENCE_FLOOR = 0.01  # mean total-variation distance below which a modality counts as unused
TILE_MULTIPLE = 32  # tile sides of one scene are a multiple of this: divisible by the strides of 5 halvings


def scene_tiles(inputs: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """One map sample ``{m: (1, C_m, H, W)}`` cut into the same grid of square tiles for every modality:
    ``{m: (T, C_m, s, s)}``, the side s a multiple of ``TILE_MULTIPLE`` near a quarter of the shorter side
    (about 16 tiles; the remainder at the bottom and right is left out). None for anything else: several
    samples, not maps, maps of different sizes, or a scene too small for two tiles."""
    shapes = {tuple(v.shape[-2:]) for v in inputs.values()}
    if not inputs or len(shapes) != 1 or any(v.dim() != 4 or v.shape[0] != 1 for v in inputs.values()):
        return None
    height, width = shapes.pop()
    side = TILE_MULTIPLE * (min(height, width) // 4 // TILE_MULTIPLE) or TILE_MULTIPLE
    rows, cols = height // side, width // side
    if rows * cols < 2:
        return None
    return {m: rearrange(v[..., :rows * side, :cols * side], "1 c (r h) (q w) -> (r q) c h w", h=side, w=side)
            for m, v in inputs.items()}  # (T, C, s, s), tiles row by row


def _probabilities(logits: Tensor) -> Tensor:
    """Class probabilities with the class axis last: (B, K) or (B, H, W, K) for dense logits (B, K, H, W)."""
    if logits.dim() == 4:
        logits = logits.permute(0, 2, 3, 1)
    return logits.float().softmax(-1)


@torch.no_grad()
def modality_dependence(model: nn.Module, inputs: Mapping[str, Tensor], *, seed: int = 0) -> dict[str, float]:
    """Per modality, the mean total-variation distance between the predictions on ``inputs`` and on
    ``inputs`` with that modality permuted across the batch (a fixed permutation drawn from ``seed``).

    Args:
        model: a module mapping a modality dict to an object with ``logits`` (``ModelOutput``), in eval mode.
        inputs: ``{m: (B, ...)}`` with B >= 2, or one map sample ``{m: (1, C, H, W)}``, which is cut into
            tiles (``scene_tiles``) that are permuted instead.

    Returns:
        ``{m: d}`` with d in [0, 1], for every modality of ``inputs`` (sorted).
    """
    batch = next(iter(inputs.values())).shape[0]
    if batch < 2:
        tiles = scene_tiles(inputs)
        if tiles is None:
            raise ValueError("modality_dependence needs at least 2 samples (or one map large enough for 2 tiles "
                             f"of {TILE_MULTIPLE} pixels) to permute a modality across them")
        inputs, batch = tiles, next(iter(tiles.values())).shape[0]
    cycle = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    order = torch.empty_like(cycle)
    order[cycle] = cycle.roll(-1)  # one random cycle through the batch: no sample keeps its own input
    reference = _probabilities(model(dict(inputs)).logits)
    out = {}
    for m in sorted(inputs):
        shuffled = dict(inputs)
        shuffled[m] = inputs[m][order.to(inputs[m].device)]
        changed = _probabilities(model(shuffled).logits)
        out[m] = float(0.5 * (changed - reference).abs().sum(-1).mean())
    return out


@torch.no_grad()
def operator_stats(model: nn.Module, inputs: Mapping[str, Tensor]) -> tuple[dict[str, float], list[str]]:
    """The ``fusion_stats`` of every module that defines it, on the inputs each received in one forward pass
    of ``inputs``, plus the ``epoch_stats`` of modules that have them.

    Returns:
        ``({"<module path>/<stat>": value}, [problems])``: a problem is one line naming a module whose
        ``carry_stat`` is zero.
    """
    seen: dict[str, Any] = {}
    hooks = []
    for name, module in model.named_modules():
        if callable(getattr(module, "fusion_stats", None)):
            def capture(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                seen.setdefault(name, args[0] if args else {})
            hooks.append(module.register_forward_pre_hook(capture))
    try:
        model(dict(inputs))
    finally:
        for hook in hooks:
            hook.remove()
    stats: dict[str, float] = {}
    carried: dict[type, list[tuple[str, float]]] = {}  # per operator class: (module name, its carry stat)
    modules = dict(model.named_modules())
    for name, received in seen.items():
        module = modules[name]
        values = module.fusion_stats(received)
        stats.update({f"{name}/{k}": float(v) for k, v in values.items()})
        carry = getattr(type(module), "carry_stat", None)
        if carry is not None and carry in values:
            carried.setdefault(type(module), []).append((name or type(module).__name__, float(values[carry])))
    problems = []
    for cls, values in carried.items():  # an operator fails only when none of its instances carried anything
        if all(v <= 0.0 for _, v in values):
            where = values[0][0] if len(values) == 1 else f"all {len(values)} {cls.__name__} modules"
            problems.append(f"{where}: {cls.carry_stat} is 0 ({cls.__name__} carried nothing between modalities)")
    for name, module in model.named_modules():
        if name not in seen and callable(getattr(module, "epoch_stats", None)):
            stats.update({f"{name}/{k}": float(v) for k, v in module.epoch_stats().items()})
    return stats, problems


def dependence_problem(dependence: Mapping[str, float], floor: float = DEPENDENCE_FLOOR) -> str | None:
    """One line when fewer than two modalities reach the prediction (dependence below ``floor``)."""
    if len(dependence) < 2:
        return None
    used = [m for m, d in dependence.items() if d >= floor]
    if len(used) >= 2:
        return None
    which = f"only '{used[0]}'" if used else "no modality"
    return f"no cross-modal dependence: {which} changes the prediction (dependence >= {floor:g})"


def fusion_diagnostics(model: nn.Module, inputs: Mapping[str, Tensor], *, seed: int = 0) -> dict[str, Any]:
    """Dependence and operator state of ``model`` on ``inputs`` (the model is put in eval mode).

    Returns:
        A flat dict for a run's metrics: ``diag_dependence/<m>``, ``diag_stat/<module>/<stat>`` and
        ``diag_problems`` ("" when the model fuses; otherwise the problems joined by "; ").
    """
    model.eval()
    out: dict[str, Any] = {}
    problems: list[str] = []
    if len(inputs) >= 2:
        dependence = modality_dependence(model, inputs, seed=seed)
        out.update({f"diag_dependence/{m}": v for m, v in dependence.items()})
        problem = dependence_problem(dependence)
        if problem:
            problems.append(problem)
    stats, stat_problems = operator_stats(model, inputs)
    out.update({f"diag_stat/{k}": v for k, v in stats.items()})
    out["diag_problems"] = "; ".join(problems + stat_problems)
    return out


def cross_modal_gradients(model: nn.Module, inputs: Mapping[str, Tensor]) -> dict[tuple[str, str], float]:
    """Norms of the gradients of each modality's own output with respect to every other modality's input.

    A modality's own output is its per-modality logits where the model has them (``ModelOutput``
    ``modality_logits``), else what the model's exchange operators (modules of contract ``exchange``) return
    for it. A model with neither (a merge of separate streams) has no per-modality output; the result is then
    empty.

    Returns:
        ``{(output modality, input modality): gradient norm}`` for every ordered pair of different modalities.
    """
    xs = {m: v.detach().clone().float().requires_grad_(True) for m, v in inputs.items()}
    captured: list[Mapping[str, Any]] = []
    hooks = [module.register_forward_hook(lambda mod, args, out: captured.append(out))
             for module in model.modules() if getattr(type(module), "contract", "") == "exchange"]
    was_training = model.training
    model.eval()
    try:
        output = model(xs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    targets: dict[str, Tensor] = {}
    if getattr(output, "modality_logits", None):
        targets = {m: v.sum() for m, v in output.modality_logits.items()}
    else:
        for out in captured:
            for m, v in out.items():
                targets[m] = targets.get(m, 0) + v.sum()
    result = {}
    for a, value in targets.items():
        others = [b for b in sorted(xs) if b != a]
        grads = torch.autograd.grad(value, [xs[b] for b in others], retain_graph=True, allow_unused=True)
        for b, g in zip(others, grads):
            result[(a, b)] = 0.0 if g is None else float(g.norm())
    return result


__all__ = ["DEPENDENCE_FLOOR", "TILE_MULTIPLE", "cross_modal_gradients", "dependence_problem", "fusion_diagnostics",
           "modality_dependence", "operator_stats", "scene_tiles"]
