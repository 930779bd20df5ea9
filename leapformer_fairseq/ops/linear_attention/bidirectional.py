"""Bidirectional factorised form: ``phi_q (phi_k^T V) / max(phi_q . sum_j phi_k(j), eps)``."""
import torch
from torch import Tensor

from .precision import accumulating, input_dtype


def bidirectional_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
    eps: float = 0.1,
) -> Tensor:
    """Every query sees every (non-pad) key. O(L d^2) time, O(L d + d^2) memory.

    Args:
        q: ``(N, Lq, f)`` query features ``phi_q``.
        k: ``(N, Lk, f)`` key features ``phi_k``.
        v: ``(N, Lk, dv)``.
        key_padding_mask: ``(N, Lk)`` bool, True at padding (those keys contribute nothing).
        query_padding_mask: ``(N, Lq)`` bool; padded queries output zeros.
    Returns:
        ``(N, Lq, dv)`` in the inputs' dtype; the sums are accumulated in float32 or wider.
    """
    dtype = input_dtype(q, k, v)
    with accumulating(q, k, v) as (q, k, v):
        if key_padding_mask is not None:
            k = k.masked_fill(key_padding_mask[..., None], 0.0)
        kv = torch.einsum("nlf,nld->nfd", k, v)
        k_sum = k.sum(dim=1)
        denominator = torch.einsum("nlf,nf->nl", q, k_sum).clamp_min(eps)
        out = (torch.bmm(q, kv) / denominator[..., None]).to(dtype)
    if query_padding_mask is not None:
        out = out.masked_fill(query_padding_mask[..., None], 0.0)
    return out
