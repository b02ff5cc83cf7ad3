"""Corruptions of one modality, for robustness evaluation and modality dropout in training.

Legend: b batch (or all samples of a split), n tokens, d width, c channels, h height, w width.

Each corruption takes a modality's tensor and a ``level`` in [0, 1]; level 0 returns the input unchanged (the
same tensor object, so a clean evaluation is reproduced bit for bit). They work on every input form:

- ``noise``: additive Gaussian noise with standard deviation ``level * scale * sigma``, where ``sigma`` is the
  modality's standard deviation (one number per modality, over all of its elements in the training split:
  per-feature deviations would put no noise on constant pixels such as an image's border).
- ``drop``: each token ``(b, n, d)`` (a whole frame of a spectrogram given as tokens), each feature of a vector
  ``(b, d)``, or each spatial position of a map ``(b, c, h, w)`` (all its channels) is set to zero with
  probability ``level``.
- ``missing``: a share ``level`` of the samples lose the whole modality: it is set to zero (``zeros``; for
  standardised inputs zero is the training mean), or, where the model's merge declares ``supports_missing``,
  left out of the input (``omit``; see ``fuselab.experiments.robustness``). ``missing_mask`` draws the samples.

Randomness comes from an explicit ``torch.Generator`` (on the CPU), so a corruption is the same for every
method evaluated with the same seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

CORRUPTIONS = ("noise", "drop", "missing")
MISSING_MODES = ("auto", "zeros", "omit")


def modality_sigma(x: Tensor) -> float:
    """One standard deviation for a whole modality (all elements of ``x``), at least 1e-6."""
    return max(float(x.float().std()), 1e-6)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=generator).to(device=like.device)


def gaussian_noise(x: Tensor, level: float, *, sigma: float, scale: float = 1.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """``x`` plus Gaussian noise of standard deviation ``level * scale * sigma``."""
    if level == 0:
        return x
    noise = torch.randn(tuple(x.shape), generator=generator).to(device=x.device, dtype=x.dtype)
    return x + noise * (level * scale * sigma)


def drop_mask_shape(x: Tensor) -> tuple[int, ...]:
    """The shape of the keep mask of ``drop``: per token, per vector feature, or per map position."""
    if x.dim() == 2:  # (b, d): features
        return tuple(x.shape)
    if x.dim() == 3:  # (b, n, d): tokens
        return (x.shape[0], x.shape[1], 1)
    if x.dim() == 4:  # (b, c, h, w): spatial positions, all channels at once
        return (x.shape[0], 1, x.shape[2], x.shape[3])
    raise ValueError(f"drop: expected a vector (B, D), tokens (B, N, D) or a map (B, C, H, W), got {tuple(x.shape)}")


def drop_elements(x: Tensor, level: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Zero each token / vector feature / map position of ``x`` with probability ``level``."""
    if level == 0:
        return x
    keep = _rand(drop_mask_shape(x), generator, x) >= level
    return x * keep.to(x.dtype)


def missing_mask(n: int, level: float, *, generator: torch.Generator | None = None) -> Tensor:
    """``(n,)`` booleans: which samples lose the modality (each with probability ``level``; all at 1)."""
    if level >= 1:
        return torch.ones(n, dtype=torch.bool)
    if level <= 0:
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=generator) < level


def zero_samples(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with the samples where ``mask`` is true set to zero (``mask``: ``(b,)`` booleans)."""
    keep = (~mask).to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x * keep


def corrupt(x: Tensor, corruption: str, level: float, *, sigma: float = 1.0, scale: float = 1.0,
            generator: torch.Generator | None = None) -> Tensor:
    """One modality's tensor under ``noise``, ``drop`` or ``missing`` (as zeros) at ``level``."""
    if corruption == "noise":
        return gaussian_noise(x, level, sigma=sigma, scale=scale, generator=generator)
    if corruption == "drop":
        return drop_elements(x, level, generator=generator)
    if corruption == "missing":
        if level == 0:
            return x
        return zero_samples(x, missing_mask(x.shape[0], level, generator=generator))
    raise ValueError(f"unknown corruption {corruption!r}; corruptions are {', '.join(CORRUPTIONS)}")


def dropout_rates(spec: float | Mapping[str, float] | None, modalities: list[str]) -> dict[str, float]:
    """``train.modality_dropout`` as a rate per modality: a number applies to every modality, a mapping
    names some (the others keep 0). Rates must lie in [0, 1]; unknown modality names are an error."""
    if spec is None:
        return {m: 0.0 for m in modalities}
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(modalities))
        if unknown:
            raise ValueError(f"train.modality_dropout names modality '{unknown[0]}'; modalities are {modalities}")
        rates = {m: float(spec.get(m, 0.0)) for m in modalities}
    else:
        rates = {m: float(spec) for m in modalities}
    for m, p in rates.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"train.modality_dropout for '{m}' must lie in [0, 1], got {p}")
    return rates


def keep_masks(batch: int, rates: Mapping[str, float], generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Modality dropout as masks: per modality with a rate above 0, a ``(batch,)`` float mask, 0 where the
    sample loses the modality (independently per modality and sample) and 1 elsewhere. ``MultiStream`` takes
    them as ``keep`` and zeroes the dropped streams at the encoders' outputs. Draws in sorted modality order,
    the same numbers as ``drop_modalities``."""
    out = {}
    for m in sorted(rates):
        p = rates[m]
        if p > 0:
            out[m] = (~missing_mask(batch, p, generator=generator)).float().to(device)
    return out


def drop_modalities(x: Mapping[str, Tensor], rates: Mapping[str, float],
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Modality dropout on the inputs (for models that take no ``keep`` masks): each sample loses each modality
    independently with that modality's rate; a lost modality is set to **zero** (the model sees zeros, as in the ``zeros`` missing mode; a sample may lose
    all its modalities). Modalities with rate 0 are returned untouched and draw no random numbers."""
    out = dict(x)
    for m in sorted(x):
        p = rates.get(m, 0.0)
        if p <= 0:
            continue
        v = x[m]
        mask = missing_mask(v.shape[0], p, generator=generator)
        out[m] = zero_samples(v, mask)
    return out


def apply_modality_dropout(model: Any, inputs: Mapping[str, Tensor], rates: Mapping[str, float],
                           generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Modality dropout of one training batch, done the way ``model`` asks for.

    A model that defines ``modality_dropout(inputs, rates, generator)`` drops the modalities itself and returns
    the inputs and the extra keyword arguments of its forward pass (``MultiStream``: per-sample ``keep`` masks,
    so the dropped streams are zeroed at its encoders' outputs); any other model gets the dropped modalities
    as zero inputs (``drop_modalities``). Returns ``(inputs, forward keyword arguments)``.
    """
    own = getattr(model, "modality_dropout", None)
    if callable(own):
        return own(inputs, rates, generator)
    return drop_modalities(inputs, rates, generator), {}


__all__ = ["CORRUPTIONS", "MISSING_MODES", "apply_modality_dropout", "corrupt", "drop_elements", "drop_mask_shape",
           "drop_modalities", "dropout_rates", "gaussian_noise", "keep_masks", "missing_mask", "modality_sigma",
           "zero_samples"]
