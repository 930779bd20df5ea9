"""Registered fairseq models (importing this module registers them)."""
from .attention_config import AttentionConfig, add_attention_args, resolve_attention_types
from .leapformer_s2t import LeaPformerS2TTransformerModel, LeaPformerS2TWaitkModel
from .leapformer_transformer import (
    LeaPformerTransformerModel,
    LeaPformerWaitkTransformerModel,
)

__all__ = [
    "AttentionConfig",
    "LeaPformerS2TTransformerModel",
    "LeaPformerS2TWaitkModel",
    "LeaPformerTransformerModel",
    "LeaPformerWaitkTransformerModel",
    "add_attention_args",
    "resolve_attention_types",
]
