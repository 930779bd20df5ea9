"""Normalised linear attention in four equivalent forms, plus the naive reference (docs/math.md §3),
the backends of the causal sums (``backends``) and the fused decode step (``fused_step``).

All tensors are ``(N, L, feature)`` with ``N = batch * heads``.
"""
from .backends import (
    BACKEND_VARIABLE,
    BACKENDS,
    SUMS,
    CausalSums,
    causal_linear_attention_with,
    fla_causal_sums,
    prefix_linear_attention_with,
    select_backend,
    torch_causal_sums,
)
from .bidirectional import bidirectional_linear_attention
from .blockwise import FeatureMap, blockwise_causal_linear_attention
from .chunk import causal_linear_attention, causal_sums
from .fused_step import (
    STEP_BACKEND_VARIABLE,
    STEP_BACKENDS,
    fused_query_state,
    fused_recurrent_step,
    select_step_backend,
)
from .naive import naive_leap_attention, naive_softmax_attention
from .precision import state_dtype
from .prefix import prefix_linear_attention
from .recurrent import LinearAttentionState, empty_state, query_state, recurrent_step, update_state

__all__ = [
    "BACKENDS",
    "BACKEND_VARIABLE",
    "STEP_BACKENDS",
    "STEP_BACKEND_VARIABLE",
    "CausalSums",
    "FeatureMap",
    "SUMS",
    "LinearAttentionState",
    "bidirectional_linear_attention",
    "blockwise_causal_linear_attention",
    "causal_linear_attention",
    "causal_linear_attention_with",
    "causal_sums",
    "fla_causal_sums",
    "fused_query_state",
    "fused_recurrent_step",
    "empty_state",
    "naive_leap_attention",
    "naive_softmax_attention",
    "prefix_linear_attention",
    "prefix_linear_attention_with",
    "query_state",
    "recurrent_step",
    "select_backend",
    "select_step_backend",
    "state_dtype",
    "torch_causal_sums",
    "update_state",
]
