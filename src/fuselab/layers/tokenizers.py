"""Tokenizers: image patches (ViT), spectrogram patches (AST) and vector features (FT-Transformer),
plus the class token, learned position embeddings, and the poolings that turn tokens back into a vector.

Legend: b batch, c channels, h height, w width of an image, t time frames, f frequency bins, n tokens,
d token width, g features per token.

- ``PatchTokenizer``: non-overlapping ``p x p`` patches by a strided convolution (ViT; scenic's
  ``embed_2d_patch``), ``(B, C, H, W) -> (B, (H/p)(W/p), D)``.
- ``SpectrogramTokenizer``: AST (Gong et al., Interspeech 2021, ``YuanGongND/ast``): a log-mel spectrogram
  ``(B, T, F)`` seen as a one-channel image, cut into ``p x p`` patches with an overlapping ``stride``
  (16 and 10 in AST). Tokens follow the convolution output's row-major (frequency, time) order, as AST
  flattens it.
- ``FeatureTokenizer``: FT-Transformer (Gorishniy et al., NeurIPS 2021, ``yandex-research/rtdl``): feature
  ``j`` becomes the token ``x_j W_j + b_j``. ``features_per_token = g > 1`` groups ``g`` consecutive
  features into one token (``x_J W_J + b_J`` with ``W_J`` of shape ``(g, D)``; the last group zero-padded),
  which keeps wide vectors (hundreds of features) to a tractable token count on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import pack, rearrange, repeat
from torch import Tensor, nn


class PatchTokenizer(nn.Module):
    """Image patches by a ``patch_size``-strided convolution.

    Args:
        in_channels: C of the input image.
        dim: token width D.
        image_size: (H, W) of the input; both must be divisible by ``patch_size``.
        patch_size: side p of a square patch.
    """

    def __init__(self, *, in_channels: int, dim: int, image_size: tuple[int, int], patch_size: int = 16) -> None:
        super().__init__()
        h, w = image_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {h}x{w} must be divisible by patch_size={patch_size}")
        self.image_size, self.patch_size = (h, w), patch_size
        self.num_tokens = (h // patch_size) * (w // patch_size)
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, D)."""
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"PatchTokenizer was built for {self.image_size} images, got shape {tuple(x.shape)}")
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class SpectrogramTokenizer(nn.Module):
    """AST-style overlapping patches of a spectrogram.

    Args:
        dim: token width D.
        frames: T, time frames of the input.
        bins: F, frequency (mel) bins of the input.
        patch_size: side of a square patch (16 in AST).
        stride: step between patches on both axes (10 in AST: 6 frames / bins of overlap).
    """

    def __init__(self, *, dim: int, frames: int, bins: int, patch_size: int = 16, stride: int = 10) -> None:
        super().__init__()
        if frames < patch_size or bins < patch_size:
            raise ValueError(f"a {frames}x{bins} spectrogram is smaller than one {patch_size}x{patch_size} patch")
        self.frames, self.bins = frames, bins
        self.num_tokens = ((bins - patch_size) // stride + 1) * ((frames - patch_size) // stride + 1)
        self.proj = nn.Conv2d(1, dim, patch_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, F) or (B, 1, T, F) -> (B, N, D)."""
        if x.dim() == 4:
            x = x.squeeze(1)
        if tuple(x.shape[1:]) != (self.frames, self.bins):
            raise ValueError(
                f"SpectrogramTokenizer was built for ({self.frames}, {self.bins}) spectrograms, got shape {tuple(x.shape)}"
            )
        x = rearrange(x, "b t f -> b 1 f t")  # AST: frequency on the height axis, time on the width axis
        return rearrange(self.proj(x), "b d f t -> b (f t) d")


class FeatureTokenizer(nn.Module):
    """FT-Transformer feature tokens for a vector, optionally ``features_per_token`` features per token.

    Args:
        in_features: F, width of the input vector.
        dim: token width D.
        features_per_token: g; 1 is FT-Transformer (one token per feature).
    """

    def __init__(self, *, in_features: int, dim: int, features_per_token: int = 1) -> None:
        super().__init__()
        if features_per_token < 1:
            raise ValueError(f"features_per_token must be at least 1, got {features_per_token}")
        self.in_features, self.group = in_features, features_per_token
        self.num_tokens = math.ceil(in_features / features_per_token)
        self.pad = self.num_tokens * features_per_token - in_features
        bound = 1 / math.sqrt(dim)  # rtdl's initialisation of the feature weights and biases
        self.weight = nn.Parameter(torch.empty(self.num_tokens, features_per_token, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(self.num_tokens, dim).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        """(B, F) -> (B, N, D) with N = ceil(F / g)."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"FeatureTokenizer was built for vectors (B, {self.in_features}), got shape {tuple(x.shape)}")
        groups = rearrange(F.pad(x, (0, self.pad)), "b (n g) -> b n g", g=self.group)  # (B, N, g)
        return torch.einsum("bng,ngd->bnd", groups, self.weight) + self.bias


class ClassToken(nn.Module):
    """Prepend a learned class token, zero-initialised as in scenic: (B, N, D) -> (B, 1 + N, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        cls = repeat(self.token, "1 1 d -> b 1 d", b=x.shape[0])
        out, _ = pack([cls, x], "b * d")
        return out


class PositionEmbedding(nn.Module):
    """Add learned position embeddings, N(0, 0.02) as BERT / scenic: (B, N, D) -> (B, N, D)."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.embedding.shape[1]:
            raise ValueError(f"expected {self.embedding.shape[1]} tokens, got shape {tuple(x.shape)}")
        return x + self.embedding


class TokenStem(nn.Module):
    """Tokenizer, optional class token, position embeddings and dropout: one modality's input to tokens.

    Args:
        tokenizer: a module with a ``num_tokens`` attribute mapping the raw input to (B, N, D).
        dim: token width D.
        class_token: prepend a class token (before the position embeddings, as scenic).
        dropout: dropout on the embedded tokens.
    """

    def __init__(self, tokenizer: nn.Module, *, dim: int, class_token: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.cls = ClassToken(dim) if class_token else nn.Identity()
        self.num_tokens = tokenizer.num_tokens + int(class_token)
        self.position = PositionEmbedding(self.num_tokens, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.position(self.cls(self.tokenizer(x))))


class ClassTokenPool(nn.Module):
    """The first token: (B, N, D) -> (B, D)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class MeanPool(nn.Module):
    """Global average over tokens: (B, N, D) -> (B, D)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


__all__ = [
    "ClassToken", "ClassTokenPool", "FeatureTokenizer", "MeanPool", "PatchTokenizer", "PositionEmbedding",
    "SpectrogramTokenizer", "TokenStem",
]
