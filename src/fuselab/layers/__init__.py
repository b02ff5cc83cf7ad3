"""Shared building blocks (attention, blocks, tokenizers); they know nothing of training."""

from fuselab.layers.attention import MultiHeadAttention, attention_flops
from fuselab.layers.tokenizers import (
    ClassToken,
    ClassTokenPool,
    FeatureTokenizer,
    MeanPool,
    PatchTokenizer,
    PositionEmbedding,
    SpectrogramTokenizer,
    TokenStem,
)
from fuselab.layers.transformer import DropPath, TransformerBlock, transformer_blocks

__all__ = [
    "ClassToken",
    "ClassTokenPool",
    "DropPath",
    "FeatureTokenizer",
    "MeanPool",
    "MultiHeadAttention",
    "PatchTokenizer",
    "PositionEmbedding",
    "SpectrogramTokenizer",
    "TokenStem",
    "TransformerBlock",
    "attention_flops",
    "transformer_blocks",
]
