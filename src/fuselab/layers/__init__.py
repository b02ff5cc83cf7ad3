"""Shared building blocks (attention, blocks, tokenizers); they know nothing of training."""

from fuselab.layers.attention import MultiHeadAttention, attention_flops

__all__ = ["MultiHeadAttention", "attention_flops"]
