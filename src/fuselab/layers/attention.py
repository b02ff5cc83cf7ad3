"""Multi-head attention on ``F.scaled_dot_product_attention``, used everywhere in fuselab.

Legend: b batch, h heads, n query tokens, s key/value tokens, d width, e = d / h per-head width.

``heads=1`` is plain (single-head) self-attention; any ``heads`` dividing the width gives the same
parameter count (4 d^2 + 4 d with biases), split into ``heads`` softmaxes of width d / heads.
Cross-attention takes separate query and key/value inputs, whose widths may differ (``kdim``, ``vdim``).
Numerically it matches ``torch.nn.MultiheadAttention(batch_first=True)`` given the same weights
(``MultiHeadAttention.from_torch`` copies them).

``torch.utils.flop_counter`` has no formula for the CPU kernel of SDPA and counts it as zero; importing
this module registers one (the same formula the counter uses for the CUDA kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils import flop_counter


class MultiHeadAttention(nn.Module):
    """Multi-head (cross-)attention.

    Args:
        dim: model width d (queries and output).
        heads: number of heads h; must divide ``dim``.
        kdim: width of the key input (default ``dim``).
        vdim: width of the value input (default ``kdim``... or ``dim``).
        dropout: attention-probability dropout during training.
        bias: biases on the four projections.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"heads={heads} must be a positive divisor of the width {dim}")
        self.dim, self.heads, self.dropout = dim, heads, dropout
        kdim = kdim or dim
        vdim = vdim or kdim
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kdim, dim, bias=bias)
        self.v_proj = nn.Linear(vdim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As nn.MultiheadAttention: Xavier-uniform over the stacked (3d, d) input projection, zero biases.
        if self.q_proj.in_features == self.k_proj.in_features == self.v_proj.in_features:
            w = torch.empty(3 * self.dim, self.dim)
            nn.init.xavier_uniform_(w)
            with torch.no_grad():
                for proj, part in zip((self.q_proj, self.k_proj, self.v_proj), w.chunk(3)):
                    proj.weight.copy_(part)
        else:
            for proj in (self.q_proj, self.k_proj, self.v_proj):
                nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` to ``key``/``value`` (self-attention when both are None).

        Args:
            query: (B, N, D).
            key: (B, S, kdim); defaults to ``query``.
            value: (B, S, vdim); defaults to ``key``.
            key_padding_mask: (B, S) bool, True where a key is padding and must be ignored.
            attn_mask: (N, S) or (B, H, N, S); bool (True = may attend) or additive float.

        Returns:
            (B, N, D).
        """
        key = query if key is None else key
        value = key if value is None else value
        if key.shape[:-1] != value.shape[:-1] or key.shape[0] != query.shape[0]:
            # checked here: the CPU kernel of scaled_dot_product_attention returns a result for such shapes
            raise ValueError(f"attention: key {tuple(key.shape)} and value {tuple(value.shape)} need the same batch "
                             f"and length, and query {tuple(query.shape)} the same batch")
        q = rearrange(self.q_proj(query), "b n (h e) -> b h n e", h=self.heads)
        k = rearrange(self.k_proj(key), "b s (h e) -> b h s e", h=self.heads)
        v = rearrange(self.v_proj(value), "b s (h e) -> b h s e", h=self.heads)
        mask = attn_mask
        if key_padding_mask is not None:
            keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
            if mask is None:
                mask = keep
            elif mask.dtype == torch.bool:
                mask = mask & keep
            else:
                mask = mask.masked_fill(~keep, float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(rearrange(out, "b h n e -> b n (h e)"))

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiHeadAttention":
        """A copy of a ``batch_first`` ``nn.MultiheadAttention``'s weights in this module."""
        bias = mha.in_proj_bias is not None or mha.out_proj.bias is not None
        new = cls(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, dropout=mha.dropout, bias=bias)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                ws = mha.in_proj_weight.chunk(3)
            else:
                ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            bs = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), ws, bs):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new


def attention_flops(batch: int, heads: int, queries: int, keys: int, head_dim: int, value_dim: int | None = None) -> int:
    """Forward FLOPs of softmax(QK^T)V: two batched matmuls, 2 FLOPs per multiply-add."""
    value_dim = head_dim if value_dim is None else value_dim
    return 2 * batch * heads * queries * keys * head_dim + 2 * batch * heads * queries * keys * value_dim


def _register_cpu_sdpa_flops() -> None:
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(fwd, get_raw=True)
        def _sdpa_cpu_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)

    if bwd is not None and bwd not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(bwd, get_raw=True)
        def _sdpa_cpu_backward_flop(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_register_cpu_sdpa_flops()
