"""Normalised linear attention in four equivalent forms, plus the naive reference (docs/math.md §3).

All tensors are ``(N, L, feature)`` with ``N = batch * heads``.
"""
from .bidirectional import bidirectional_linear_attention
from .blockwise import FeatureMap, blockwise_causal_linear_attention
from .chunk import causal_linear_attention
from .naive import naive_leap_attention, naive_softmax_attention
from .precision import state_dtype
from .prefix import prefix_linear_attention
from .recurrent import LinearAttentionState, empty_state, query_state, recurrent_step, update_state

__all__ = [
    "FeatureMap",
    "LinearAttentionState",
    "bidirectional_linear_attention",
    "blockwise_causal_linear_attention",
    "causal_linear_attention",
    "empty_state",
    "naive_leap_attention",
    "naive_softmax_attention",
    "prefix_linear_attention",
    "query_state",
    "recurrent_step",
    "state_dtype",
    "update_state",
]
