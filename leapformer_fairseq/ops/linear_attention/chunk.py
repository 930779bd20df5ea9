"""Causal chunked form: masked scores inside a chunk plus the state carried from earlier chunks.

Never builds an ``L x L`` matrix: memory is ``O(L c + (L / c) f dv)`` for chunk size ``c``.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import accumulating, input_dtype
from .recurrent import LinearAttentionState


def causal_sums(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chunk_size: int = 64,
    initial_kv: Optional[Tensor] = None,
    output_final_state: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Unnormalised causal sums ``o_i = sum_{j <= i} (q_i . k_j) v_j (+ q_i S_0)``, chunked, in
    the inputs' dtype (the caller chooses the precision).

    Args:
        q: ``(N, L, f)``; k: ``(N, L, f)``; v: ``(N, L, dv)``.
        chunk_size: rows per chunk; a sequence no longer than one chunk is one masked ``L x L``
            chunk, with no ``f x dv`` state unless one is carried in or asked for.
        initial_kv: ``(N, f, dv)`` sums ``S_0`` over keys before this block, or None.
        output_final_state: also return ``S_0 + sum_j k_j^T v_j``.
    Returns:
        ``(N, L, dv)`` sums and the final ``(N, f, dv)`` state (``None`` if not asked for).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, length, feature_dim = q.shape
    value_dim = v.shape[-1]
    chunk_size = min(chunk_size, length)
    padding = (-length) % chunk_size
    if padding:
        q, k, v = (F.pad(x, (0, 0, 0, padding)) for x in (q, k, v))
    n_chunks = (length + padding) // chunk_size
    q = q.reshape(batch, n_chunks, chunk_size, feature_dim)
    k = k.reshape(batch, n_chunks, chunk_size, feature_dim)
    v = v.reshape(batch, n_chunks, chunk_size, value_dim)

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill(~causal, 0.0)
    sums = torch.matmul(scores, v)
    final_state = None
    if n_chunks > 1 or initial_kv is not None or output_final_state:
        # Sums over each chunk, then exclusive prefix sums over chunks.
        kv_chunk = torch.matmul(k.transpose(-1, -2), v)
        kv_before = F.pad(kv_chunk[:, :-1].cumsum(dim=1), (0, 0, 0, 0, 1, 0))
        if initial_kv is not None:
            kv_before = kv_before + initial_kv[:, None]
        if output_final_state:
            final_state = kv_before[:, -1] + kv_chunk[:, -1]
        if n_chunks > 1 or initial_kv is not None:
            sums = sums + torch.matmul(q, kv_before)
    return sums.reshape(batch, n_chunks * chunk_size, value_dim)[:, :length], final_state


def causal_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chunk_size: int = 64,
    key_padding_mask: Tensor | None = None,
    eps: float = 0.1,
    initial_state: LinearAttentionState | None = None,
    output_final_state: bool = True,
) -> tuple[Tensor, LinearAttentionState | None]:
    """Query i sees keys ``j <= i`` (and everything in ``initial_state``).

    Args:
        q: ``(N, L, f)`` query features; k: ``(N, L, f)`` key features; v: ``(N, L, dv)``.
        chunk_size: rows per chunk (:func:`causal_sums`); ``L`` need not be a multiple of it.
        key_padding_mask: ``(N, L)`` bool, True at padding (those keys contribute nothing).
        initial_state: sums over keys that precede this block (incremental use).
        output_final_state: also return the state after the last key.
    Returns:
        ``(N, L, dv)`` outputs in the inputs' dtype and the final state (``None`` if not asked
        for). Scores, sums and the state are computed in float32 or wider (:func:`state_dtype`).
    """
    dtype = input_dtype(q, k, v)
    with accumulating(q, k, v, *(initial_state or ())) as (q, k, v, *initial):
        value_dim = v.shape[-1]
        if key_padding_mask is not None:
            k = k.masked_fill(key_padding_mask[..., None], 0.0)
        # a column of ones after the values: its sums are the denominators, and its state the
        # key sum, so numerator and denominator come from the same products
        v = F.pad(v, (0, 1), value=1.0)
        initial_kv = None
        if initial:
            initial_kv = torch.cat([initial[0], initial[1].unsqueeze(-1)], dim=-1)
        both, final = causal_sums(q, k, v, chunk_size, initial_kv, output_final_state)
        out = both[..., :value_dim] / both[..., value_dim:].clamp_min(eps)
    final_state = None
    if final is not None:
        final_state = LinearAttentionState(kv=final[..., :value_dim].contiguous(),
                                           k_sum=final[..., value_dim].contiguous())
    return out.to(dtype), final_state
