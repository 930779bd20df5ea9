"""Registered fairseq models (importing this module registers them)."""
from .attention_config import AttentionConfig, add_attention_args, resolve_attention_types
from .leapformer_transformer import (
    LeaPformerTransformerModel,
    LeaPformerWaitkTransformerModel,
)

__all__ = [
    "AttentionConfig",
    "LeaPformerTransformerModel",
    "LeaPformerWaitkTransformerModel",
    "add_attention_args",
    "resolve_attention_types",
]
