"""Feature maps of docs/math.md §1-2: relu features, the sin/cos re-weighting by proportions, and
Hedgehog's softmax features.

With ``phi(x, p) = [sin(pi p / 2) x, cos(pi p / 2) x]`` the LeaP score
``(q~ . k~) cos(pi/2 (p - p'))`` equals ``phi(q~, p) . phi(k~, p')``, so every linear-attention
form applies unchanged to the 2d-dimensional features.
"""
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


def relu_features(x: Tensor) -> Tensor:
    """The non-negative feature map ``x~ = relu(x)``; any shape."""
    return F.relu(x)


def sincos_features(features: Tensor, proportion: Tensor) -> Tensor:
    """Re-weight non-negative features by a proportion in (0, 1).

    Both weights come from one ``cos`` over the angles ``pi p / 2 - [pi / 2, 0]`` (``sin a =
    cos(a - pi / 2)``): a few ops whatever the shape, which is what a decode step pays.

    Args:
        features: ``(..., L, d)``, non-negative.
        proportion: ``(..., L, 1)``, one proportion per row.
    Returns:
        ``(..., L, 2d)``: ``[sin(pi p / 2) x, cos(pi p / 2) x]``.
    """
    phases = _phases(proportion.device, proportion.dtype)
    weights = torch.cos(torch.add(phases, proportion, alpha=math.pi / 2))
    return (weights.unsqueeze(-1) * features.unsqueeze(-2)).flatten(-2)


# the phases that turn ``cos`` into ``[sin, cos]``
PHASES = (-math.pi / 2, 0.0)


def _phases(device: torch.device, dtype: torch.dtype) -> Tensor:
    """:data:`PHASES` as a ``(2,)`` tensor, made once per device and dtype; under
    ``torch.compile`` a constant of the graph (the compiler would guard on a cache's contents,
    and compile again once it fills)."""
    if torch.compiler.is_compiling():
        return torch.tensor(PHASES, device=device, dtype=dtype)
    return _cached_phases(device, dtype)


@lru_cache(maxsize=None)
def _cached_phases(device: torch.device, dtype: torch.dtype) -> Tensor:
    """:data:`PHASES` (a normal tensor even when first asked for under
    ``torch.inference_mode``)."""
    with torch.inference_mode(False):
        return torch.tensor(PHASES, device=device, dtype=dtype)


def stacked_linear(x: Tensor, weight_t: Tensor, bias: Tensor) -> Tensor:
    """One linear layer per stack entry (the query and key sides of a feature map) in one op.

    Args:
        x: ``(S, M, d_in)``; weight_t: ``(S, d_in, d_out)``, the weights transposed;
        bias: ``(S, 1, d_out)``.
    Returns:
        ``(S, M, d_out)``: ``x[s] @ weight_t[s] + bias[s]``.
    """
    return torch.baddbmm(bias, x, weight_t)


def softmax_features(x: Tensor) -> Tensor:
    """Hedgehog's features of mapped inputs: ``sqrt(2d) * softmax([x, -x])`` over the ``2d``
    entries, ``(..., L, d) -> (..., L, 2d)``. Positive everywhere; the factor ``sqrt(2d)`` makes
    two uniform feature vectors score 1, the scale of the clamp ``eps``."""
    dim = x.size(-1)
    return torch.softmax(torch.cat([x, -x], dim=-1), dim=-1) * math.sqrt(2 * dim)


def positions_from_padding(padding_mask: Tensor, start: Tensor | int = 0) -> Tensor:
    """Position of each non-pad token counted from its sequence's first real token.

    Works for left and right padding alike, which keeps cosFormer padding-invariant.

    Args:
        padding_mask: ``(B, L)`` bool, True at padding.
        start: position of the first new token, ``int`` or ``(B,)`` (incremental use).
    Returns:
        ``(B, L)`` float positions; padded slots hold the position of the previous real token.
    """
    counts = (~padding_mask).to(torch.float32).cumsum(dim=1) - 1.0
    if isinstance(start, Tensor):
        return counts.clamp_min(0.0) + start.to(counts).unsqueeze(1)
    return counts.clamp_min(0.0) + float(start)


def cosformer_proportions(positions: Tensor, max_positions: int) -> Tensor:
    """cosFormer's fixed re-weighting ``p_i = i / M`` with a fixed ``M``; any shape."""
    return positions / float(max_positions)
