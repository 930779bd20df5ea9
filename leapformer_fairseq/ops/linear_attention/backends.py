"""Backends of the causal sums, behind the causal and prefix-limited forms.

A backend computes only the unnormalised causal sums ``o_i = sum_{j <= i} (q_i . k_j) v_j`` (a
``CausalSums``); the forms here add what every backend shares: padded keys, the denominator
``q_i . sum_{j <= i} k_j`` and its clamp ``max(., eps)`` in float32, and, for prefix-limited
(wait-k) attention, an exact reduction to one causal call. Backends (``BACKENDS``):

- ``torch``: the native forms of this package (chunked sums in float32), every device.
- ``torch-sums``: :func:`torch_causal_sums` through these wrappers, every device: the wrapper
  logic a kernel backend runs, checked on CPU.
- ``fla``: fla-core's Triton ``chunk_linear_attn`` (CUDA; fp32 and bf16, which keep float32
  sums; fp16 is refused). Opt-in: not yet measured or checked on a GPU by this project.

The backend is chosen per call by :func:`select_backend` from ``LEAPFORMER_ATTENTION_BACKEND``.
"""
import logging
import os
from functools import lru_cache
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunk import causal_sums
from .precision import accumulating, input_dtype, state_dtype
from .recurrent import LinearAttentionState

logger = logging.getLogger(__name__)

# (q (N, L, f), k (N, L, f), v (N, L, dv), initial kv (N, f, dv) or None, output_final_state)
#   -> (sums (N, L, dv) in any float dtype, final kv (N, f, dv) in float32 or None)
CausalSums = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], bool],
                      Tuple[Tensor, Optional[Tensor]]]

BACKEND_VARIABLE = "LEAPFORMER_ATTENTION_BACKEND"
BACKENDS = ("torch", "torch-sums", "fla")


def torch_causal_sums(q: Tensor, k: Tensor, v: Tensor, initial_kv: Optional[Tensor] = None,
                      output_final_state: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """The ``CausalSums`` of PyTorch: :func:`causal_sums` in float32 (or wider), chunks of 64."""
    with accumulating(q, k, v, *([] if initial_kv is None else [initial_kv])) as (q, k, v, *s):
        return causal_sums(q, k, v, 64, s[0] if s else None, output_final_state)


def fla_causal_sums(q: Tensor, k: Tensor, v: Tensor, initial_kv: Optional[Tensor] = None,
                    output_final_state: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """The ``CausalSums`` of fla-core's ``chunk_linear_attn`` (unnormalised, scale 1): each of
    the ``N`` rows as a batch entry with one head (fla's layout ``[B, T, H, K]``). Its sums are
    float32 inside the kernel; the output comes back in the inputs' dtype."""
    from fla.ops.linear_attn import chunk_linear_attn

    q, k, v = (x.unsqueeze(2).contiguous() for x in (q, k, v))
    initial = None if initial_kv is None else initial_kv.unsqueeze(1).float().contiguous()
    out, final = chunk_linear_attn(q, k, v, scale=1.0, initial_state=initial,
                                   output_final_state=output_final_state, normalize=False)
    return out.squeeze(2), None if final is None else final.squeeze(1)


SUMS = {"torch-sums": torch_causal_sums, "fla": fla_causal_sums}


@lru_cache(maxsize=None)
def _fla_importable() -> bool:
    try:
        import fla.ops.linear_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend for inputs on ``device`` in ``dtype``: ``LEAPFORMER_ATTENTION_BACKEND``
    (``torch``, the default; ``torch-sums``; ``fla``). A backend that cannot serve the call is
    an error naming the variable, never a silent switch."""
    name = os.environ.get(BACKEND_VARIABLE, "torch") or "torch"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_VARIABLE}={name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "fla":
        if torch.device(device).type != "cuda":
            raise ValueError(f"{BACKEND_VARIABLE}=fla runs on CUDA tensors only, got {device}")
        if dtype == torch.float16:
            raise ValueError(f"{BACKEND_VARIABLE}=fla: fp16 inputs are refused (fla's running "
                             "sums may overflow fp16); use bf16 or fp32")
        if not _fla_importable():
            raise ValueError(f"{BACKEND_VARIABLE}=fla needs fla-core "
                             "(fla-core==0.6.0: pip install -e '.[gpu]' in the repository)")
        _report_once(name)
    return name


@lru_cache(maxsize=None)
def _report_once(name: str) -> None:
    logger.info("attention backend: %s (%s)", name, BACKEND_VARIABLE)


def causal_linear_attention_with(
    sums: CausalSums,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    eps: float = 0.1,
    initial_state: Optional[LinearAttentionState] = None,
    output_final_state: bool = False,
) -> Tuple[Tensor, Optional[LinearAttentionState]]:
    """:func:`causal_linear_attention` with the numerator from the backend ``sums``.

    Args:
        q, k: ``(N, L, f)`` features; v: ``(N, L, dv)``; key_padding_mask: ``(N, L)`` bool.
        initial_state: sums over earlier keys; output_final_state: also return the state.
    Returns:
        ``(N, L, dv)`` in the inputs' dtype and the final state (float32 or wider). The
        denominator, its clamp and the division are float32 (or wider).
    """
    dtype = input_dtype(q, k, v)
    if key_padding_mask is not None:
        k = k.masked_fill(key_padding_mask[..., None], 0.0)
    numerator, final_kv = sums(q, k, v, None if initial_state is None else initial_state.kv,
                               output_final_state)
    with accumulating(q, k, *(initial_state or ())) as (q, k, *initial):
        k_seen = k.cumsum(dim=1)
        if initial:
            k_seen = k_seen + initial[1][:, None]
        denominator = (q * k_seen).sum(dim=-1).clamp_min(eps)
        out = numerator.to(state_dtype(dtype)) / denominator[..., None]
    final_state = None
    if output_final_state:
        final_state = LinearAttentionState(kv=final_kv, k_sum=k_seen[:, -1])
    return out.to(dtype), final_state


def prefix_linear_attention_with(
    sums: CausalSums,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_limit: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    eps: float = 0.1,
) -> Tensor:
    """:func:`prefix_linear_attention` (query i sees keys ``j < key_limit[i]``) as one causal
    call of the backend ``sums`` over a merged sequence.

    Keys and queries are merged in the order of the sort keys ``2 (j + 1)`` (key j) and
    ``2 key_limit[i] + 1`` (query i), ties kept in order; queries are zero at key slots and
    keys and values zero at query slots. The causal sum at query i's slot is then exactly
    ``sum_{j < key_limit[i]} (q_i . k_j) v_j``. The denominator needs no merge: the float32
    prefix sums of the keys, read at ``key_limit[i]``.

    Args:
        q: ``(N, Lq, f)``; k: ``(N, Lk, f)``; v: ``(N, Lk, dv)``.
        key_limit: ``(Lq,)`` or ``(N, Lq)`` integer; any limits (clamped to ``0 .. Lk``).
        key_padding_mask: ``(N, Lk)``; query_padding_mask: ``(N, Lq)``; both bool, True at pad.
    Returns:
        ``(N, Lq, dv)`` in the inputs' dtype.
    """
    dtype = input_dtype(q, k, v)
    n, query_length, feature_dim = q.shape
    key_length, value_dim = k.shape[1], v.shape[-1]
    limit = key_limit.clamp(0, key_length).expand(n, query_length)
    if key_padding_mask is not None:
        k = k.masked_fill(key_padding_mask[..., None], 0.0)
    key_order = 2 * torch.arange(1, key_length + 1, device=q.device).expand(n, key_length)
    order = torch.cat([key_order, 2 * limit + 1], dim=1).argsort(dim=1, stable=True)

    def merged(x_keys: Tensor, x_queries: Tensor) -> Tensor:
        both = torch.cat([x_keys, x_queries], dim=1)
        return both.gather(1, order[..., None].expand(-1, -1, both.shape[-1]))

    merged_sums, _ = sums(merged(q.new_zeros(n, key_length, feature_dim), q),
                          merged(k, k.new_zeros(n, query_length, feature_dim)),
                          merged(v, v.new_zeros(n, query_length, value_dim)), None, False)
    query_slots = order.argsort(dim=1)[:, key_length:]
    numerator = merged_sums.gather(1, query_slots[..., None].expand(-1, -1, value_dim))
    with accumulating(q, k) as (q, k):
        k_prefix = F.pad(k.cumsum(dim=1), (0, 0, 1, 0))  # row m: the sum of the first m keys
        k_seen = k_prefix.gather(1, limit[..., None].expand(-1, -1, feature_dim))
        denominator = (q * k_seen).sum(dim=-1).clamp_min(eps)
        out = (numerator.to(state_dtype(dtype)) / denominator[..., None]).to(dtype)
    if query_padding_mask is not None:
        out = out.masked_fill(query_padding_mask[..., None], 0.0)
    return out
