"""Token operators: cross-modal attention (MulT), token exchange (TokenFusion), cross-attention pooling.

Legend: b batch, m modality, n tokens of the target modality, s context tokens, d width, q pooling queries.

All attention goes through ``fuselab.layers.MultiHeadAttention`` (``heads`` must divide the width; the
parameter count does not depend on it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import repeat
from torch import Tensor, nn

from fuselab.fusion.base import ChannelLinear, Exchange, Merge
from fuselab.layers.attention import MultiHeadAttention
from fuselab.registry import FUSIONS


def _check_heads(heads: int, widths: Mapping[str, int], where: str) -> None:
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"{where}: heads must be a positive integer, got {heads!r}")
    for m, d in widths.items():
        if d % heads:
            raise ValueError(f"{where}: heads={heads} must divide the width of '{m}' ({d})")


@FUSIONS.register("cross-attention")
class CrossAttention(Exchange):
    """Cross-modal attention (MulT: Tsai et al., ACL 2019; ``yaohungt/Multimodal-Transformer``
    ``modules/transformer.py``): queries from one modality, keys and values from the others.

    For each target modality m, the other modalities' tokens are projected to m's width (where widths differ),
    layer-normed and concatenated along the token axis; ``x_m + MHA(LN(x_m), ctx, ctx)``. Token counts may
    differ between modalities.

    Deliberate differences: MulT runs one crossmodal transformer per (target, source) pair, each with its own
    feed-forward sublayer and several layers, and concatenates the per-source outputs on the feature axis;
    this is one pre-norm cross-attention sublayer per target over all sources at once, so the width is kept
    and any number of modalities works. Stack it with the streams' own blocks for MulT's depth.

    Args:
        dims: token width of each modality.
        heads: attention heads (must divide every width).
        dropout: attention-probability dropout.
    """

    forms = ("tokens",)
    same_size = False
    multimodal_rule = "each modality's queries attend over the concatenated tokens of all other modalities"
    natural_out_dim = "unchanged (an exchange keeps every stream's shape)"
    paper = "Tsai et al., Multimodal Transformer for Unaligned Multimodal Language Sequences, ACL 2019"
    reference = "yaohungt/Multimodal-Transformer modules/transformer.py (TransformerEncoderLayer with x_k, x_v)"
    formula = "x_m' = x_m + MHA(q=LN(x_m), k=v=[LN(P_s x_s) for s != m])"

    def __init__(self, dims: Mapping[str, int], *, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__(dims)
        _check_heads(heads, self.dims, "cross-attention")
        self.heads = heads
        self.norm = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in self.dims.items()})
        self.attn = nn.ModuleDict({m: MultiHeadAttention(d, heads, dropout=dropout) for m, d in self.dims.items()})
        self.proj = nn.ModuleDict({
            f"{s}_to_{m}": nn.Sequential(ChannelLinear(self.dims[s], d) if self.dims[s] != d else nn.Identity(),
                                        nn.LayerNorm(d))
            for m, d in self.dims.items() for s in self.modalities if s != m
        })

    def exchange(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for m, x in xs.items():
            ctx = torch.cat([self.proj[f"{s}_to_{m}"](xs[s]) for s in xs if s != m], dim=1)  # (B, S, D_m)
            out[m] = x + self.attn[m](self.norm[m](x), ctx, ctx)
        return out


class _TokenScore(nn.Module):
    """Per-token keep score in (0, 1): LN -> Linear -> GELU -> Linear(2) -> softmax, first entry."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = max(dim // 2, 1)
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).softmax(-1)[..., 0]  # (B, N)


@FUSIONS.register("token-exchange")
class TokenExchange(Exchange):
    """TokenFusion token exchange (Wang et al., CVPR 2022; ``yikaiw/TokenFusion``, ``TokenExchange`` and
    ``PredictorLG``): a per-token score ``s_m = softmax(MLP(x_m))[0]``; where ``s_m < threshold`` the token is
    replaced by the other modalities' mean token at the same position. ``aux_losses()`` returns the L1 term
    on the scores (``mean |s|``) that pushes uninformative tokens to be replaced. Token positions must be
    aligned: every modality needs the same token count and width.

    Deliberate differences: TokenFusion multiplies its attention branch by the scores inside its block so the
    scorer gets a gradient; as a standalone exchange this operator passes the task gradient to the scores
    straight through (forward value unchanged, ``d out / d s = x``). Its scorer is a smaller MLP than
    ``PredictorLG``. For more than two modalities the replacement is the mean of the others (TokenFusion is
    two-modal).

    Args:
        dims: token width of each modality (all equal).
        threshold: score below which a token is replaced (TokenFusion's 0.02).
    """

    forms = ("tokens",)
    multimodal_rule = "a replaced token takes the mean of the other modalities' tokens at the same position"
    natural_out_dim = "unchanged (an exchange keeps every stream's shape)"
    paper = "Wang et al., Multimodal Token Fusion for Vision Transformers, CVPR 2022"
    reference = "yikaiw/TokenFusion (TokenExchange, PredictorLG)"
    formula = "x_m'[n] = x_m[n] if s_m[n] >= threshold else mean_{k != m} x_k[n];  aux: mean |s_m|"

    @classmethod
    def fusion_problem(cls, options: Mapping[str, Any]) -> str | None:
        threshold = options.get("threshold", 0.02)
        if isinstance(threshold, (int, float)) and threshold <= 0:
            return (f"exchange.threshold={threshold} never replaces a token (a score is never below it), so "
                    "token-exchange carries nothing between modalities; use a threshold above 0 (TokenFusion: 0.02)")
        return None

    def __init__(self, dims: Mapping[str, int], *, threshold: float = 0.02) -> None:
        super().__init__(dims)
        if len(set(self.dims.values())) != 1:
            raise ValueError(f"token-exchange: every modality needs the same width, got {self.dims}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"token-exchange: threshold must be in [0, 1), got {threshold}")
        self.threshold = threshold
        self.score = nn.ModuleDict({m: _TokenScore(d) for m, d in self.dims.items()})
        self._scores: dict[str, Tensor] = {}

    def exchange(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        total = torch.stack(list(xs.values())).sum(0)  # (B, N, D)
        n_other = len(xs) - 1
        self._scores = {}
        out = {}
        for m, x in xs.items():
            s = self.score[m](x)  # (B, N)
            self._scores[m] = s
            others = (total - x) / max(n_other, 1)
            keep = (s >= self.threshold)[..., None]
            y = torch.where(keep, x, others) if n_other else x
            out[m] = y + (s - s.detach())[..., None] * x  # straight-through gradient to the scores
        return out

    def aux_losses(self) -> dict[str, Tensor]:
        if not self._scores:
            return {}
        return {"l1": torch.stack([s.abs().mean() for s in self._scores.values()]).mean()}


@FUSIONS.register("cross-attention-pool")
class CrossAttentionPool(Merge):
    """Learned-query attention pooling of all modalities' tokens to one vector (the pooling of MulT's
    final stage and of Perceiver-style readouts; Set Transformer's PMA).

    Every modality's tokens are projected to a common ``width`` (where widths differ) and layer-normed; one
    learned query per modality attends over the concatenation of all modalities' tokens; the pooled vectors
    are concatenated in sorted modality order (then a Linear to ``out_dim`` when given). A vector input is a
    single token. The output is a vector ``(B, out_dim)`` for tokens as well as vectors: this merge pools.

    Args:
        dims: width of each modality.
        out_dim: output width; None keeps ``M * width``.
        width: attention width; None is the largest input width rounded up to a multiple of ``heads``.
        heads: attention heads (must divide ``width``).
    """

    forms = ("vector", "tokens")
    same_size = False
    pools_tokens = True  # tokens (B, N, D) in, a vector (B, out_dim) out
    multimodal_rule = "one learned query per modality over the tokens of all modalities; results concatenated"
    natural_out_dim = "number of modalities x width"
    paper = "Tsai et al., MulT, ACL 2019 (pooling); Lee et al., Set Transformer PMA, ICML 2019"
    reference = "yaohungt/Multimodal-Transformer; juho-lee/set_transformer modules.py (PMA)"
    formula = "z = [MHA(q_m, K[x_1..x_M], V[x_1..x_M]) for m] (then Linear)"

    def __init__(
        self, dims: Mapping[str, int], out_dim: int | None = None, *, width: int | None = None, heads: int = 4
    ) -> None:
        super().__init__(dims, out_dim)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"cross-attention-pool: heads must be a positive integer, got {heads!r}")
        if width is None:
            width = -(-max(self.dims.values()) // heads) * heads
        _check_heads(heads, {"width": width}, "cross-attention-pool")
        self.width = width
        self.proj = nn.ModuleDict({
            m: nn.Sequential(ChannelLinear(d, width) if d != width else nn.Identity(), nn.LayerNorm(width))
            for m, d in self.dims.items()
        })
        self.queries = nn.Parameter(torch.randn(len(self.dims), width) * 0.02)  # (Q = M, D)
        self.attn = MultiHeadAttention(width, heads)
        pooled = len(self.dims) * width
        self.out = nn.Linear(pooled, out_dim) if out_dim is not None else nn.Identity()
        self.out_dim = out_dim or pooled

    def merge(self, xs: dict[str, Tensor]) -> Tensor:
        tokens = torch.cat([self.proj[m](x if x.dim() == 3 else x[:, None]) for m, x in xs.items()], dim=1)
        q = repeat(self.queries, "q d -> b q d", b=tokens.shape[0])
        pooled = self.attn(q, tokens, tokens)  # (B, M, width)
        return self.out(pooled.flatten(1))
