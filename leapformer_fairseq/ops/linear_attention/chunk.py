"""Causal chunked form: masked scores inside a chunk plus the state carried from earlier chunks.

Never builds an ``L x L`` matrix: memory is ``O(L c + (L / c) f dv)`` for chunk size ``c``.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import accumulating, input_dtype
from .recurrent import LinearAttentionState


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
        chunk_size: rows per chunk; ``L`` need not be a multiple of it. A sequence no longer
            than one chunk is a single chunk of its own length: masked ``L x L`` scores, and
            no ``f x dv`` state unless one is carried in or asked for.
        key_padding_mask: ``(N, L)`` bool, True at padding (those keys contribute nothing).
        initial_state: sums over keys that precede this block (incremental use).
        output_final_state: also return the state after the last key.
    Returns:
        ``(N, L, dv)`` outputs in the inputs' dtype and the final state (``None`` if not asked
        for). Scores, sums and the state are computed in float32 or wider (:func:`state_dtype`).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = input_dtype(q, k, v)
    with accumulating(q, k, v, *(initial_state or ())) as (q, k, v, *initial):
        initial_state = LinearAttentionState(*initial) if initial else None
        batch, length, feature_dim = q.shape
        value_dim = v.shape[-1]
        chunk_size = min(chunk_size, length)
        if key_padding_mask is not None:
            k = k.masked_fill(key_padding_mask[..., None], 0.0)
        padding = (-length) % chunk_size
        if padding:
            q, k, v = (F.pad(x, (0, 0, 0, padding)) for x in (q, k, v))
        n_chunks = (length + padding) // chunk_size
        q = q.reshape(batch, n_chunks, chunk_size, feature_dim)
        k = k.reshape(batch, n_chunks, chunk_size, feature_dim)
        v = v.reshape(batch, n_chunks, chunk_size, value_dim)

        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
        scores = torch.einsum("bcif,bcjf->bcij", q, k).masked_fill(~causal, 0.0)
        numerator = torch.matmul(scores, v)
        denominator = scores.sum(dim=-1)
        final_state = None
        if n_chunks > 1 or initial_state is not None or output_final_state:
            # Sums over each chunk, then exclusive prefix sums over chunks.
            kv_chunk = torch.einsum("bcif,bcid->bcfd", k, v)
            k_chunk = k.sum(dim=2)
            kv_before = F.pad(kv_chunk[:, :-1].cumsum(dim=1), (0, 0, 0, 0, 1, 0))
            k_before = F.pad(k_chunk[:, :-1].cumsum(dim=1), (0, 0, 1, 0))
            if initial_state is not None:
                kv_before = kv_before + initial_state.kv[:, None]
                k_before = k_before + initial_state.k_sum[:, None]
            if output_final_state:
                final_state = LinearAttentionState(kv=kv_before[:, -1] + kv_chunk[:, -1],
                                                   k_sum=k_before[:, -1] + k_chunk[:, -1])
            if n_chunks > 1 or initial_state is not None:
                numerator = numerator + torch.matmul(q, kv_before)
                denominator = denominator + torch.einsum("bcif,bcf->bci", q, k_before)
        out = numerator / denominator.clamp_min(eps)[..., None]
    out = out.reshape(batch, n_chunks * chunk_size, value_dim)[:, :length]
    return out.to(dtype), final_state
