"""``custom-streams``: any ``nn.Module`` per modality as its encoder, by import path, in the generic MultiStream.

Config::

    model:
      name: custom-streams
      encoders:
        image: {target: mypkg.nets.SmallCNN, channels: 32}      # kwargs go to the constructor
        audio: {target: torch.nn.Identity}
        "*":   {target: timm:resnet18, in_chans: 1}             # default for modalities not listed

An encoder returns a vector (B, D), tokens (B, N, D), a map (B, C, H, W), or a list/tuple of staged outputs
(the last stage is fused). Output widths are found by running each encoder once on two samples, so
``out_dim`` is only needed when that is not possible. ``timm:NAME`` builds a timm model (``pip install timm``)
without pretrained weights and without its classifier.

A config is data, never code to run: a ``target`` must be an ``nn.Module`` subclass (checked before anything
is called), or a factory function a plugin has allowed with :func:`allow_encoder_factory`. So a config
(or a tampered ``config.yaml`` in a shared store) cannot name ``os.system`` or any other callable.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fuselab.fusion.base import FORM_RANK
from fuselab.models.merging import merge_and_head
from fuselab.models.multistream import MultiStream
from fuselab.registry import MODELS

_FORM_OF_RANK = {rank: form for form, rank in FORM_RANK.items()}


_ALLOWED_FACTORIES: dict[str, Any] = {}  # import path -> a function that returns an nn.Module


def allow_encoder_factory(target: str) -> Any:
    """Allow a function (not an ``nn.Module`` class) as an encoder ``target``; use it as a decorator in a
    plugin::

        @allow_encoder_factory("myplugin.small_cnn")
        def small_cnn(channels: int = 32) -> nn.Module: ...
    """

    def register(factory: Any) -> Any:
        _ALLOWED_FACTORIES[target] = factory
        return factory

    return register


def import_target(target: str) -> Any:
    """``pkg.mod.Name`` -> the object; one clear error when it cannot be imported."""
    module_name, _, attr = target.rpartition(".")
    if not module_name or not all(part.isidentifier() for part in target.split(".")):
        raise ValueError(f"encoder target '{target}' must be a dotted import path like mypkg.nets.MyNet")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"encoder target '{target}': cannot import '{module_name}' ({exc})") from None
    if not hasattr(module, attr):
        raise ValueError(f"encoder target '{target}': module '{module_name}' has no '{attr}'")
    return getattr(module, attr)


def resolve_target(target: str) -> Any:
    """The class (an ``nn.Module`` subclass) or allowed factory an encoder ``target`` names; anything
    else is refused before it is called."""
    if target in _ALLOWED_FACTORIES:
        return _ALLOWED_FACTORIES[target]
    obj = import_target(target)
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return obj
    kind = "a class that is not an nn.Module" if isinstance(obj, type) else f"a {type(obj).__name__}, not an nn.Module class"
    raise ValueError(f"encoder target '{target}' is {kind}; targets must be nn.Module subclasses "
                     "(a plugin can allow a factory function with fuselab.models.custom.allow_encoder_factory)")


def build_encoder(spec: Mapping[str, Any]) -> nn.Module:
    spec = dict(spec)
    target = spec.pop("target", None)
    spec.pop("out_dim", None)
    if not target or not isinstance(target, str):
        raise ValueError("every model.encoders entry needs a target, e.g. {target: mypkg.nets.MyNet}")
    if target.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ValueError(f"encoder '{target}' needs timm: pip install timm") from None
        return timm.create_model(target[5:], pretrained=False, num_classes=0, **spec)
    cls = resolve_target(target)
    try:
        module = cls(**spec)
    except TypeError as exc:
        raise ValueError(f"encoder target '{target}': {exc}") from None
    if not isinstance(module, nn.Module):
        raise ValueError(f"encoder target '{target}' built a {type(module).__name__}, not an nn.Module")
    return module


class LastStage(nn.Module):
    """Wraps an encoder so that staged outputs (a list or tuple) give their last stage."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        out = self.encoder(x)
        return out[-1] if isinstance(out, (list, tuple)) else out


class GlobalPool(nn.Module):
    """Fused tokens or maps to a vector: the mean over tokens or pixels."""

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() == 4:
            return z.mean((2, 3))
        if z.dim() == 3:
            return z.mean(1)
        return z


def _output_width(m: str, module: nn.Module, spec: Mapping[str, Any], example: Mapping[str, Tensor] | None) -> tuple[int, str]:
    """The width and form of an encoder's output: measured on two samples of ``example``, else its ``out_dim``
    (a vector)."""
    if example is None:
        if "out_dim" not in spec:
            raise ValueError(f"model.encoders.{m}: give out_dim (no example batch to measure it on)")
        return int(spec["out_dim"]), "vector"
    x = example[m][:2]
    with torch.no_grad():
        was = module.training
        try:
            out = module.eval()(x)
        except Exception as exc:  # noqa: BLE001 - a user's encoder that does not fit the data
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"encoder of '{m}' ({spec.get('target')}) fails on an input of shape "
                             f"{tuple(x.shape)}: {first}") from None
        module.train(was)
    if not isinstance(out, Tensor):
        raise ValueError(f"encoder of '{m}' returned a {type(out).__name__}; expected a tensor "
                         "(B, D), (B, N, D) or (B, C, H, W), or a list of them")
    form = _FORM_OF_RANK.get(out.dim())
    if form is None or out.shape[0] != x.shape[0]:
        raise ValueError(f"encoder of '{m}' returned shape {tuple(out.shape)} for a batch of {x.shape[0]}; "
                         "expected (B, D), (B, N, D) or (B, C, H, W) with the batch first")
    return int(out.shape[1] if out.dim() == 4 else out.shape[-1]), form


@MODELS.register("custom-streams")
def custom_streams(
    *,
    dims: Mapping[str, int],
    num_classes: int,
    fusion: Mapping[str, Any],
    encoders: dict[str, Any],
    dropout: float = 0.0,
    example: Mapping[str, Tensor] | None = None,
) -> MultiStream:
    """Per-modality encoders given by import path; the merge on their (last-stage) outputs; a linear head.

    Args:
        dims: input width per modality (from the dataset).
        num_classes: classes of the head.
        fusion: the merge's config.
        encoders: per modality (or ``"*"`` for all others) ``{target: import.path, **constructor kwargs}``.
        dropout: dropout before the head.
        example: a small batch of inputs, used to find each encoder's output width and form.
    """
    modules: dict[str, nn.Module] = {}
    for m in dims:
        spec = encoders.get(m, encoders.get("*"))
        if spec is None:
            raise ValueError(f"model.encoders has no entry for modality '{m}' (and no '*' default)")
        modules[m] = LastStage(build_encoder(spec))
    widths: dict[str, int] = {}
    forms: set[str] = set()
    for m, module in modules.items():
        widths[m], form = _output_width(m, module, encoders.get(m, encoders.get("*")), example)
        forms.add(form)
    point = merge_and_head(fusion, num_classes=num_classes)
    if len(forms) > 1:
        raise ValueError(f"encoders return different forms ({', '.join(sorted(forms))}); make them agree")
    form = forms.pop()
    if form not in point.info.forms:
        raise ValueError(f"fusion '{point.name}' takes {', '.join(point.info.forms)}, but the encoders return {form}")
    merge = point.merge(widths)
    head = point.head(merge.out_dim, make=lambda width: nn.Sequential(GlobalPool(), nn.Dropout(dropout), nn.Linear(width, num_classes)))
    return MultiStream(encoders=modules, merge=merge, head=head)
