"""Wrapping token exchanges: MBT's attention bottlenecks and joint (vanilla cross-modal) attention.

Legend: b batch, m modality, h heads, n tokens of one modality, z bottleneck tokens, d width, e = d / h.

Both run the streams' own transformer layers (``fuselab.layers.TransformerBlock``), one per modality per
depth, with the cross-modal step inside each layer. Reference: Nagrani et al., "Attention Bottlenecks for
Multimodal Fusion", NeurIPS 2021; scenic ``projects/mbt/model.py`` (``Encoder``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from einops import pack, repeat, unpack
from torch import Tensor, nn

from fuselab.fusion.base import WrappingExchange
from fuselab.registry import FUSIONS


def _layer_width(layers: Mapping[str, Sequence[nn.Module]], where: str) -> int:
    """The common token width of the wrapped layers (their ``dim`` attribute)."""
    widths = {}
    for m, seq in layers.items():
        for layer in seq:
            d = getattr(layer, "dim", None)
            if not isinstance(d, int):
                raise ValueError(f"{where}: layers must expose their token width as .dim (fuselab.layers.TransformerBlock); "
                                 f"'{m}' has a {type(layer).__name__}")
            widths.setdefault(m, d)
            if d != widths[m]:
                raise ValueError(f"{where}: the layers of '{m}' have different widths")
    if len(set(widths.values())) != 1:
        raise ValueError(f"{where}: every modality needs the same token width, got {widths}")
    return next(iter(widths.values()))


class _TokenWrapping(WrappingExchange):
    forms = ("tokens",)
    same_size = False  # token counts may differ between modalities
    supports_missing = True
    natural_out_dim = "unchanged (an exchange keeps every stream's shape)"

    def __init__(self, layers: Mapping[str, Sequence[nn.Module]]) -> None:
        super().__init__(layers)
        self.width = _layer_width(layers, type(self).__name__)
        self.dims = {m: self.width for m in self.modalities}


@FUSIONS.register("bottleneck")
class Bottleneck(_TokenWrapping):
    """MBT attention bottlenecks (Nagrani et al., NeurIPS 2021; scenic ``projects/mbt/model.py``).

    Each wrapped layer of modality m runs on ``[x_m, z]`` (its tokens, then the bottleneck tokens); the
    modality keeps its part, and the updated bottleneck copies are averaged over the modalities into the next
    layer's ``z``. ``z`` starts from ``n_bottlenecks`` learned tokens, N(0, 0.02). Cross-modal information
    therefore reaches a modality's tokens one layer after the first wrapped layer (that layer reads the learned
    initial ``z``). A missing modality is left out of the average.

    Deliberate difference: scenic adds one bottleneck token when the classifier is a class token
    (``n_bottlenecks + 1``); here ``n_bottlenecks`` is exactly the number of bottleneck tokens.

    Args:
        layers: per modality, the layers spanned (same count and width for every modality).
        n_bottlenecks: number of bottleneck tokens.

    Input / output: ``{m: (B, N_m, D)}``.
    """

    multimodal_rule = "one shared set of bottleneck tokens; the modalities' updated copies are averaged"
    paper = "Nagrani et al., Attention Bottlenecks for Multimodal Fusion, NeurIPS 2021"
    reference = "google-research/scenic projects/mbt/model.py (Encoder, use_bottleneck=True)"
    formula = "[x_m^{l+1}, z_m^{l+1}] = Layer_m^l([x_m^l, z^l]);  z^{l+1} = mean_m z_m^{l+1};  z^0 ~ N(0, 0.02)"

    def __init__(self, layers: Mapping[str, Sequence[nn.Module]], *, n_bottlenecks: int = 4) -> None:
        super().__init__(layers)
        if isinstance(n_bottlenecks, bool) or not isinstance(n_bottlenecks, int) or n_bottlenecks < 1:
            raise ValueError(f"bottleneck: n_bottlenecks must be a positive integer, got {n_bottlenecks!r}")
        self.n_bottlenecks = n_bottlenecks
        self.bottleneck = nn.Parameter(torch.randn(1, n_bottlenecks, self.width) * 0.02)

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        xs = self.check_inputs(inputs)
        batch = next(iter(xs.values())).shape[0]
        z = repeat(self.bottleneck, "1 z d -> b z d", b=batch)
        for i in range(self.depth):
            copies = []
            for m, x in xs.items():
                joined, ps = pack([x, z], "b * d")  # (B, N_m + Z, D)
                xs[m], z_m = unpack(self.layers[m][i](joined), ps, "b * d")
                copies.append(z_m)
            z = torch.stack(copies).mean(0)  # (B, Z, D)
        return xs


@FUSIONS.register("joint-attention")
class JointAttention(_TokenWrapping):
    """Joint attention over all modalities' tokens (MBT's "vanilla" cross-modal fusion, scenic
    ``projects/mbt/model.py`` with ``use_bottleneck=False``).

    In each wrapped layer every modality computes queries, keys and values of its own tokens with its own
    weights; each modality's queries attend over the keys and values of all modalities (concatenated in sorted
    name order); output projection and MLP are the modality's own. With shared weights this is exactly
    scenic's ``share_encoder`` path (one layer over the concatenated sequence).

    Deliberate difference: without shared weights scenic runs each modality's whole layer over the
    concatenation of all tokens and keeps its own part, so the other modalities' tokens are projected (and
    pushed through the MLP, then discarded) with this modality's weights, at M times the linear cost. Here a
    token is always projected by its own modality's weights, which is also what makes the cost comparable to
    the bottleneck's.

    Args:
        layers: per modality, ``TransformerBlock``-like layers (with ``project`` and ``finish``).

    Input / output: ``{m: (B, N_m, D)}``.
    """

    multimodal_rule = "each modality's queries attend over the tokens of all modalities"
    paper = "Nagrani et al., Attention Bottlenecks for Multimodal Fusion, NeurIPS 2021 (vanilla cross-modal fusion)"
    reference = "google-research/scenic projects/mbt/model.py (Encoder, use_bottleneck=False)"
    formula = "x_m^{l+1} = Layer_m^l(x_m^l; keys/values = [K_1 x_1, ..., K_M x_M])"

    def __init__(self, layers: Mapping[str, Sequence[nn.Module]]) -> None:
        super().__init__(layers)
        for m in self.modalities:
            for layer in self.layers[m]:
                if not (hasattr(layer, "project") and hasattr(layer, "finish")):
                    raise ValueError(
                        f"joint-attention: layers need project() and finish() (fuselab.layers.TransformerBlock); "
                        f"'{m}' has a {type(layer).__name__}"
                    )
        heads = {m: self.layers[m][0].heads for m in self.modalities}
        if len(set(heads.values())) != 1:
            raise ValueError(f"joint-attention: every modality needs the same number of heads, got {heads}")

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        xs = self.check_inputs(inputs)
        for i in range(self.depth):
            qkv = {m: self.layers[m][i].project(x) for m, x in xs.items()}  # each (B, H, N_m, E)
            k = torch.cat([t[1] for t in qkv.values()], dim=2)  # (B, H, sum N_m, E)
            v = torch.cat([t[2] for t in qkv.values()], dim=2)
            xs = {m: self.layers[m][i].finish(x, qkv[m][0], k, v) for m, x in xs.items()}
        return xs


__all__ = ["Bottleneck", "JointAttention"]
