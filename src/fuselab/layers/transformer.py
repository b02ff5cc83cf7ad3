"""Pre-norm transformer block on the shared multi-head attention module, with stochastic depth.

Legend: b batch, h heads, n tokens, s key/value tokens, d width, e = d / h per-head width.

The block is ViT's / scenic's ``EncoderBlock``: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``, GELU MLP of
``mlp_ratio * d``, dropout after the attention output and inside the MLP, per-example stochastic depth on
each residual branch. ``project`` / ``finish`` split the block around its softmax so that a wrapping exchange
(``joint-attention``) can let each modality's queries attend over every modality's keys and values while
every token still goes through its own modality's weights.

Deliberate difference from scenic ``projects/mbt/model.py``: stochastic depth rescales the kept branch by
``1 / (1 - p)`` (timm's ``DropPath``); scenic drops without rescaling, so its train and eval outputs differ
in expectation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fuselab.layers.attention import MultiHeadAttention


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of the batch during training.

    Args:
        p: probability of dropping the branch of one example.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        keep.bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout (ViT's MlpBlock)."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        for fc in (self.fc1, self.fc2):  # as scenic's MlpBlock: Xavier-uniform weights, tiny normal biases
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block.

    Args:
        dim: token width d.
        heads: attention heads h (must divide ``dim``); the parameter count does not depend on it.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: dropout on the attention output and inside the MLP.
        attn_dropout: dropout on the attention probabilities.
        drop_path: stochastic-depth probability of each residual branch.
        norm: the normalisation layer class.
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        norm: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.norm1 = norm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout=attn_dropout)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        x = x + self.drop_path(self.dropout(self.attn(self.norm1(x))))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The block's own queries, keys and values of ``x``: three (B, H, N, E) tensors."""
        y = self.norm1(x)
        a = self.attn
        return tuple(rearrange(p(y), "b n (h e) -> b h n e", h=self.heads) for p in (a.q_proj, a.k_proj, a.v_proj))

    def finish(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The rest of the block after attending ``q`` (B, H, N, E) over ``k``, ``v`` (B, H, S, E); -> (B, N, D)."""
        p = self.attn.dropout if self.training else 0.0
        heads = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        x = x + self.drop_path(self.dropout(self.attn.out_proj(rearrange(heads, "b h n e -> b n (h e)"))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def transformer_blocks(
    *, depth: int, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
    attn_dropout: float = 0.0, drop_path: float = 0.0,
) -> list[TransformerBlock]:
    """``depth`` blocks whose stochastic-depth rate grows linearly from 0 to ``drop_path`` (as scenic)."""
    return [
        TransformerBlock(
            dim=dim, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, attn_dropout=attn_dropout,
            drop_path=drop_path * i / max(depth - 1, 1),
        )
        for i in range(depth)
    ]
