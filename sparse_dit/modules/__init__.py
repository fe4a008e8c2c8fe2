"""Building blocks of the DiT: attention with 3D rotary positions, embeddings, feed-forward."""

from sparse_dit.modules.attention import CrossAttention, RotaryEmbedding3D, SelfAttention, apply_rotary, rope_axis_dims
from sparse_dit.modules.embeddings import (
    LabelEmbedder,
    PatchEmbed3D,
    TextEmbedder,
    TimestepEmbedder,
    sincos_pos_embed,
    timestep_embedding,
)
from sparse_dit.modules.mlp import FeedForward

__all__ = [
    "CrossAttention",
    "RotaryEmbedding3D",
    "SelfAttention",
    "apply_rotary",
    "rope_axis_dims",
    "LabelEmbedder",
    "PatchEmbed3D",
    "TextEmbedder",
    "TimestepEmbedder",
    "sincos_pos_embed",
    "timestep_embedding",
    "FeedForward",
]
