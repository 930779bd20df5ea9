"""Pure tensor functions: feature maps and the forms of normalised linear attention."""
from .feature_map import (
    cosformer_proportions,
    positions_from_padding,
    relu_features,
    sincos_features,
)
from .linear_attention import *  # noqa: F401,F403
from .linear_attention import __all__ as _linear_attention_all

__all__ = [
    "cosformer_proportions",
    "positions_from_padding",
    "relu_features",
    "sincos_features",
    *_linear_attention_all,
]
