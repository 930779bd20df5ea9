"""Recurrent form: ``S += phi_k^T v``, ``z += phi_k``, ``o = phi_q S / max(phi_q . z, eps)``.

The state is kept in float32 (float64 for float64 inputs) whatever the input dtype; its size
does not depend on the length.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from .precision import accumulating, state_dtype


class LinearAttentionState(NamedTuple):
    """Sums over the keys seen so far.

    kv: ``(N, f, dv)``, ``sum_j phi_k(j)^T v_j``.
    k_sum: ``(N, f)``, ``sum_j phi_k(j)``.
    Both in :func:`state_dtype` of the inputs.
    """

    kv: Tensor
    k_sum: Tensor


def empty_state(
    batch: int,
    feature_dim: int,
    value_dim: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LinearAttentionState:
    """The state before any key: zeros in ``state_dtype(dtype)``."""
    dtype = state_dtype(dtype)
    return LinearAttentionState(
        kv=torch.zeros(batch, feature_dim, value_dim, dtype=dtype, device=device),
        k_sum=torch.zeros(batch, feature_dim, dtype=dtype, device=device),
    )


def _add_keys(kv: Tensor, k_sum: Tensor, k: Tensor, v: Tensor) -> LinearAttentionState:
    """``S + k^T v``, ``z + sum_t k``: ``(N, f, dv)``, ``(N, f)`` state, ``(N, t, f)`` keys,
    ``(N, t, dv)`` values, all in the state's dtype. One key is a rank-1 update (``addcmul``,
    cheaper than a matmul over ``t = 1``)."""
    if k.size(1) == 1:
        return LinearAttentionState(kv=torch.addcmul(kv, k.transpose(1, 2), v),
                                    k_sum=k_sum + k.squeeze(1))
    return LinearAttentionState(kv=torch.baddbmm(kv, k.transpose(1, 2), v),
                                k_sum=k_sum + k.sum(dim=1))


def _read(kv: Tensor, k_sum: Tensor, q: Tensor, eps: float) -> Tensor:
    """``q S / max(q . z, eps)``: ``(N, t, f)`` queries -> ``(N, t, dv)``, in the state's dtype.
    Both products are ``bmm`` (the denominator's a ``(f, 1)`` column: one op, fewer than a
    ``vecdot`` in a decode step)."""
    denominator = torch.bmm(q, k_sum.unsqueeze(-1))
    return torch.bmm(q, kv) / denominator.clamp_min(eps)


def update_state(
    state: LinearAttentionState, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
) -> LinearAttentionState:
    """Add ``t`` new keys to the state.

    Args:
        k: ``(N, t, f)`` key features; v: ``(N, t, dv)``.
        key_padding_mask: ``(N, t)`` bool, True at padding (ignored keys).
    """
    with accumulating(*state, k, v) as (kv, k_sum, k, v):
        if key_padding_mask is not None:
            k = k.masked_fill(key_padding_mask[..., None], 0.0)
        return _add_keys(kv, k_sum, k, v)


def query_state(state: LinearAttentionState, q: Tensor, eps: float = 0.1) -> Tensor:
    """Read the state with ``t`` queries: ``(N, t, f) -> (N, t, dv)`` in ``q``'s dtype."""
    dtype = q.dtype
    with accumulating(*state, q) as (kv, k_sum, q):
        return _read(kv, k_sum, q, eps).to(dtype)


def recurrent_step(
    state: LinearAttentionState, q: Tensor, k: Tensor, v: Tensor, eps: float = 0.1
) -> tuple[LinearAttentionState, Tensor]:
    """One causal step: add key ``k`` (with value ``v``), then read with ``q``.

    Args:
        state: sums over the previous keys.
        q, k: ``(N, 1, f)`` features of the new token; v: ``(N, 1, dv)``.
    Returns:
        The new state and the output ``(N, 1, dv)`` in ``q``'s dtype.
    """
    dtype = q.dtype
    if dtype == k.dtype == v.dtype == state.kv.dtype and \
            not torch.is_autocast_enabled(q.device.type):  # nothing to cast (the decode loop)
        state = _add_keys(*state, k, v)
        return state, _read(*state, q, eps)
    with accumulating(*state, q, k, v) as (kv, k_sum, q, k, v):
        state = _add_keys(kv, k_sum, k, v)
        return state, _read(*state, q, eps).to(dtype)
