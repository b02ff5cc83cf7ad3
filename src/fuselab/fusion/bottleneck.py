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

    carry_stat = "cross_attention"  # fusion diagnostics: at 0 the bottleneck carried nothing between modalities
    takes_keep = True  # MultiStream passes modality-dropout masks (``keep``) to ``forward``

    def forward(self, inputs: Mapping[str, Tensor], keep: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Args:
            inputs: ``{m: (B, N_m, D)}``; a missing modality is left out of the bottleneck mean.
            keep: optional per-modality ``(B,)`` masks (modality dropout): a sample whose modality is dropped
                (mask 0) leaves that modality's copy out of its bottleneck mean, as if it were missing.
        """
        return self._run(self.check_inputs(inputs), keep)

    def _run(self, xs: dict[str, Tensor], keep: Mapping[str, Tensor] | None,
             shares: list[list[float]] | None = None) -> dict[str, Tensor]:
        batch = next(iter(xs.values())).shape[0]
        z = repeat(self.bottleneck, "1 z d -> b z d", b=batch)
        weights = _copy_weights(xs, keep)  # (M, B, 1, 1) or None
        for i in range(self.depth):
            copies = []
            for m, x in xs.items():
                joined, ps = pack([x, z], "b * d")  # (B, N_m + Z, D)
                if shares is not None:
                    shares[i].append(_attention_to_tail(self.layers[m][i], joined, x.shape[1]))
                xs[m], z_m = unpack(self.layers[m][i](joined), ps, "b * d")
                copies.append(z_m)
            z = _mean_copies(torch.stack(copies), weights)  # (B, Z, D)
        return xs

    @torch.no_grad()
    def fusion_stats(self, inputs: Mapping[str, Tensor]) -> dict[str, float]:
        """On ``inputs``: ``cross_attention``, the share of attention the modality tokens pay to the bottleneck
        tokens in the blocks where those carry other modalities' information (every wrapped block after the
        first; 0 when the exchange spans one block), averaged over blocks, modalities, heads, tokens and
        samples; ``initial_attention``, the same share in the first block (learned tokens only)."""
        if not all(hasattr(layer, "project") for seq in self.layers.values() for layer in seq):
            return {}  # layers of one's own without TransformerBlock.project: attention cannot be read
        shares: list[list[float]] = [[] for _ in range(self.depth)]
        self._run(self.check_inputs(inputs), None, shares)
        later = [s for block in shares[1:] for s in block]
        return {"cross_attention": sum(later) / len(later) if later else 0.0,
                "initial_attention": sum(shares[0]) / len(shares[0])}


def _attention_to_tail(layer: nn.Module, joined: Tensor, n: int) -> float:
    """Mean share of attention that the first ``n`` tokens of ``joined`` (B, N + Z, D) pay to the last Z in
    ``layer``'s self-attention (from its own queries and keys, as ``TransformerBlock.project`` gives them)."""
    q, k, _ = layer.project(joined)  # (B, H, N + Z, E)
    attn = (q[:, :, :n] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # (B, H, N, N + Z)
    return float(attn[..., n:].sum(-1).mean())


def _copy_weights(xs: Mapping[str, Tensor], keep: Mapping[str, Tensor] | None) -> Tensor | None:
    """(M, B, 1, 1) weights of the modalities' bottleneck copies (1 kept, 0 dropped); None when all are kept."""
    if not keep or not any(m in keep for m in xs):
        return None
    x0 = next(iter(xs.values()))
    ones = x0.new_ones(x0.shape[0])
    return torch.stack([keep[m].to(x0.dtype) if m in keep else ones for m in xs]).view(len(xs), -1, 1, 1)


def _mean_copies(copies: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of (M, B, Z, D) bottleneck copies over the modalities, weighted per sample by (M, B, 1, 1)."""
    if weights is None:
        return copies.mean(0)
    return (copies * weights).sum(0) / weights.sum(0).clamp_min(1.0)


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

    carry_stat = "cross_attention"  # fusion diagnostics: at 0 no modality attended to another

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._run(self.check_inputs(inputs))

    def _run(self, xs: dict[str, Tensor], shares: list[float] | None = None) -> dict[str, Tensor]:
        for i in range(self.depth):
            qkv = {m: self.layers[m][i].project(x) for m, x in xs.items()}  # each (B, H, N_m, E)
            k = torch.cat([t[1] for t in qkv.values()], dim=2)  # (B, H, sum N_m, E)
            v = torch.cat([t[2] for t in qkv.values()], dim=2)
            if shares is not None:
                shares += _attention_to_others([t[0] for t in qkv.values()], k)
            xs = {m: self.layers[m][i].finish(x, qkv[m][0], k, v) for m, x in xs.items()}
        return xs

    @torch.no_grad()
    def fusion_stats(self, inputs: Mapping[str, Tensor]) -> dict[str, float]:
        """On ``inputs``: ``cross_attention``, the share of attention each modality's tokens pay to the other
        modalities' tokens, averaged over blocks, modalities, heads, tokens and samples."""
        shares: list[float] = []
        self._run(self.check_inputs(inputs), shares)
        return {"cross_attention": sum(shares) / len(shares)}


def _attention_to_others(queries: Sequence[Tensor], k: Tensor) -> list[float]:
    """Per modality, the mean share of attention its queries (B, H, N_m, E) pay to the keys ``k``
    (B, H, sum N_m, E) of the other modalities (the modalities' keys concatenated in the same order)."""
    out, start = [], 0
    for q in queries:
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # (B, H, N_m, sum N)
        out.append(float((1 - attn[..., start : start + q.shape[2]].sum(-1)).mean()))
        start += q.shape[2]
    return out


__all__ = ["Bottleneck", "JointAttention"]
