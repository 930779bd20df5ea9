"""Pure tensor functions: feature maps and the forms of normalised linear attention."""
from .feature_map import (
    cosformer_proportions,
    positions_from_padding,
    relu_features,
    sincos_features,
    softmax_features,
)
from .linear_attention import (
    FeatureMap,
    LinearAttentionState,
    bidirectional_linear_attention,
    blockwise_causal_linear_attention,
    causal_linear_attention,
    empty_state,
    naive_leap_attention,
    naive_softmax_attention,
    prefix_linear_attention,
    query_state,
    recurrent_step,
    state_dtype,
    update_state,
)

__all__ = [
    "FeatureMap",
    "LinearAttentionState",
    "bidirectional_linear_attention",
    "blockwise_causal_linear_attention",
    "causal_linear_attention",
    "cosformer_proportions",
    "empty_state",
    "naive_leap_attention",
    "naive_softmax_attention",
    "positions_from_padding",
    "prefix_linear_attention",
    "query_state",
    "recurrent_step",
    "relu_features",
    "sincos_features",
    "softmax_features",
    "state_dtype",
    "update_state",
]
