"""Naive references, written straight from the formulas of docs/math.md §1.

They build the full ``(N, Lq, Lk)`` score matrix and are meant for tests only.
"""
import math

import torch
from torch import Tensor


def _allowed_keys(
    scores: Tensor, attn_allowed: Tensor | None, key_padding_mask: Tensor | None
) -> Tensor:
    """Bool ``(N, Lq, Lk)``: True where query i may see key j."""
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if attn_allowed is not None:
        allowed = allowed & attn_allowed
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, :]
    return allowed


def naive_leap_attention(
    q_features: Tensor,
    k_features: Tensor,
    v: Tensor,
    q_proportion: Tensor | None = None,
    k_proportion: Tensor | None = None,
    attn_allowed: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
    eps: float = 0.1,
) -> Tensor:
    """``o_i = sum_j s_ij v_j / max(sum_j s_ij, eps)`` with
    ``s_ij = (q~_i . k~_j) cos(pi/2 (p_i - p'_j))`` (or plain ``q~_i . k~_j`` without proportions).

    Args:
        q_features: ``(N, Lq, d)`` non-negative query features ``q~``.
        k_features: ``(N, Lk, d)`` non-negative key features ``k~``.
        v: ``(N, Lk, dv)``.
        q_proportion, k_proportion: ``(N, Lq)``, ``(N, Lk)`` or both None (plain linear).
        attn_allowed: bool ``(Lq, Lk)`` or ``(N, Lq, Lk)``, True where i may attend j.
        key_padding_mask: ``(N, Lk)`` bool, True at padding.
        query_padding_mask: ``(N, Lq)`` bool; padded queries output zeros.
    Returns:
        ``(N, Lq, dv)``.
    """
    scores = torch.einsum("nid,njd->nij", q_features, k_features)
    if q_proportion is not None:
        angle = (math.pi / 2) * (q_proportion[:, :, None] - k_proportion[:, None, :])
        scores = scores * torch.cos(angle)
    allowed = _allowed_keys(scores, attn_allowed, key_padding_mask)
    scores = torch.where(allowed, scores, torch.zeros_like(scores))
    denominator = scores.sum(dim=-1, keepdim=True).clamp_min(eps)
    out = torch.einsum("nij,njd->nid", scores, v) / denominator
    if query_padding_mask is not None:
        out = out.masked_fill(query_padding_mask[..., None], 0.0)
    return out


def naive_softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_allowed: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """``o_i = sum_j softmax_j(q_i . k_j) v_j`` over the allowed keys (q already scaled).

    Shapes as in :func:`naive_leap_attention`. A query with no allowed key outputs zeros.
    """
    scores = torch.einsum("nid,njd->nij", q, k)
    allowed = _allowed_keys(scores, attn_allowed, key_padding_mask)
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("nij,njd->nid", weights, v)
