"""Drop-in ``nn.Module``s with fairseq's call signature and ``incremental_state``."""
from .leap_multihead_attention import (
    ATTN_TYPES,
    LEAP_FEATURE_MAPS,
    LINEAR_ATTN_TYPES,
    LeaPMultiheadAttention,
    leap_proportion_mlp,
)
from .streaming_positions import (
    StreamingSinusoidalPositionalEmbedding,
    sinusoidal_embeddings,
    sinusoidal_rows,
)

__all__ = [
    "ATTN_TYPES",
    "LEAP_FEATURE_MAPS",
    "LINEAR_ATTN_TYPES",
    "LeaPMultiheadAttention",
    "StreamingSinusoidalPositionalEmbedding",
    "leap_proportion_mlp",
    "sinusoidal_embeddings",
    "sinusoidal_rows",
]
