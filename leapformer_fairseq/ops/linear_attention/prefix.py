"""Prefix-limited form (wait-k cross-attention, docs/math.md §3): query i sees keys
``j < limit[i]``."""
import torch
from torch import Tensor

from .precision import accumulating, input_dtype


def prefix_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_limit: Tensor,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
    eps: float = 0.1,
) -> Tensor:
    """Masked ``Lq x Lk`` scores; never a ``Lq x Lk x f x dv`` tensor.

    Args:
        q: ``(N, Lq, f)`` query features; k: ``(N, Lk, f)`` key features; v: ``(N, Lk, dv)``.
        key_limit: ``(Lq,)`` or ``(N, Lq)`` integer, number of leading keys query i sees
            (non-decreasing in i for wait-k; any limits give the right answer here).
        key_padding_mask: ``(N, Lk)`` bool, True at padding.
        query_padding_mask: ``(N, Lq)`` bool; padded queries output zeros.
    Returns:
        ``(N, Lq, dv)`` in the inputs' dtype; scores and sums are computed in float32 or wider.
    """
    key_index = torch.arange(k.shape[1], device=k.device)
    allowed = key_index < key_limit.unsqueeze(-1)
    if allowed.dim() == 2:
        allowed = allowed.unsqueeze(0)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, :]
    dtype = input_dtype(q, k, v)
    with accumulating(q, k, v) as (q, k, v):
        scores = torch.bmm(q, k.transpose(1, 2)).masked_fill(~allowed, 0.0)
        denominator = scores.sum(dim=-1).clamp_min(eps)
        out = (torch.bmm(scores, v) / denominator[..., None]).to(dtype)
    if query_padding_mask is not None:
        out = out.masked_fill(query_padding_mask[..., None], 0.0)
    return out
