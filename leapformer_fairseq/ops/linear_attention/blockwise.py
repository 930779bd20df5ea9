"""Causal linear attention with the feature map fused in and recomputed block by block.

Autograd on the chunked form keeps every intermediate (projections, features, chunk scores,
chunk states) alive until backward. Here the forward pass runs block by block without building
a graph and keeps only its input ``x`` (what the feature map reads, e.g. the layer input), the
values only where they cannot be recomputed (dropout), and one state per block; the backward
pass recomputes one block at a time (feature map included) under the autocast state of the
forward pass and differentiates it with autograd. Peak memory is ``O(L d)`` for the inputs and
their gradients plus ``O(block_size)`` working memory, and the gradients are autograd's own.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .chunk import causal_linear_attention
from .precision import current_autocast, input_dtype
from .recurrent import LinearAttentionState

# feature_map(x_block, rows) -> (phi_q, phi_k, v): the rows ``rows`` of ``x`` (``x[:, rows]``) to
# query and key features ``(N, b, f)`` and values ``(N, b, dv)`` (``None`` when the values are
# passed in). It must be deterministic: no dropout.
FeatureMap = Callable[[Tensor, slice], Tuple[Tensor, Tensor, Optional[Tensor]]]


def _block_rows(length: int, block_size: int) -> List[slice]:
    return [slice(start, min(start + block_size, length)) for start in range(0, length, block_size)]


def _block_inputs(
    feature_map: FeatureMap, x_block: Tensor, values_block: Optional[Tensor], rows: slice
) -> Tuple[Tensor, Tensor, Tensor]:
    """Features and values of the block ``rows``."""
    phi_q, phi_k, v = feature_map(x_block, rows)
    if values_block is not None:
        if v is not None:
            raise ValueError("feature_map must return v=None when values are passed in")
        return phi_q, phi_k, values_block
    if v is None:
        raise ValueError("feature_map returned v=None and no values were passed in")
    return phi_q, phi_k, v


class _BlockwiseCausal(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, feature_map, chunk_size, block_size, key_padding_mask, eps, x, values, *params
    ):
        length = x.shape[1]
        blocks = _block_rows(length, block_size)
        kv_states, k_sum_states = [], []
        state: Optional[LinearAttentionState] = None
        for index, rows in enumerate(blocks):
            values_block = None if values is None else values[:, rows]
            phi_q, phi_k, v = _block_inputs(feature_map, x[:, rows], values_block, rows)
            if index == 0:
                # Rows outermost in memory: for fairseq's ``(L, B * H, d)`` layout, merging the
                # heads of the output back is then a view, not a copy.
                out = v.new_empty(length, v.shape[0], v.shape[-1],
                                  dtype=input_dtype(phi_q, phi_k, v)).transpose(0, 1)
            else:
                kv_states.append(state.kv)
                k_sum_states.append(state.k_sum)
            mask = None if key_padding_mask is None else key_padding_mask[:, rows]
            out[:, rows], state = causal_linear_attention(
                phi_q, phi_k, v, chunk_size, mask, eps, initial_state=state,
                output_final_state=index + 1 < len(blocks),
            )
        ctx.feature_map, ctx.chunk_size, ctx.blocks = feature_map, chunk_size, blocks
        ctx.autocast = current_autocast(x.device.type)
        ctx.key_padding_mask, ctx.eps = key_padding_mask, eps
        ctx.n_states = len(kv_states)
        ctx.save_for_backward(x, values, *kv_states, *k_sum_states, *params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, values, *rest = ctx.saved_tensors
        n_states = ctx.n_states
        kv_states, k_sum_states = rest[:n_states], rest[n_states:2 * n_states]
        params = rest[2 * n_states:]
        grad_x = torch.zeros_like(x)
        grad_values = None if values is None else torch.zeros_like(values)
        grad_params = [torch.zeros_like(p) for p in params]
        grad_state: List[Tensor] = []  # gradient w.r.t. the state leaving the current block
        for index in reversed(range(len(ctx.blocks))):
            rows = ctx.blocks[index]
            with torch.enable_grad():
                x_block = x.detach()[:, rows].requires_grad_()
                values_block = None
                if values is not None:
                    values_block = values.detach()[:, rows].requires_grad_()
                initial = [] if index == 0 else [
                    kv_states[index - 1].detach().requires_grad_(),
                    k_sum_states[index - 1].detach().requires_grad_(),
                ]
                mask = None if ctx.key_padding_mask is None else ctx.key_padding_mask[:, rows]
                # The forward pass's autocast state for the recomputation only: autograd.grad
                # below differentiates in the dtypes the recorded ops ran in.
                with ctx.autocast():
                    phi_q, phi_k, v = _block_inputs(ctx.feature_map, x_block, values_block, rows)
                    out, state = causal_linear_attention(
                        phi_q, phi_k, v, ctx.chunk_size, mask, ctx.eps,
                        initial_state=LinearAttentionState(*initial) if initial else None,
                        output_final_state=bool(grad_state),
                    )
                outputs = [out, *([state.kv, state.k_sum] if grad_state else [])]
                leaves = [x_block, *initial, *params]
                if values is not None:
                    leaves.append(values_block)
                grads = torch.autograd.grad(
                    outputs, leaves, [grad_out[:, rows], *grad_state], allow_unused=True,
                )
            grad_x[:, rows] = grads[0]
            grad_state = list(grads[1:1 + len(initial)])
            for total, grad in zip(grad_params, grads[1 + len(initial):][:len(params)]):
                if grad is not None:
                    total += grad
            if values is not None:
                grad_values[:, rows] = grads[-1]
        return (None, None, None, None, None, grad_x, grad_values, *grad_params)


def blockwise_causal_linear_attention(
    x: Tensor,
    feature_map: FeatureMap,
    feature_params: Sequence[Tensor] = (),
    values: Optional[Tensor] = None,
    chunk_size: int = 64,
    block_size: int = 256,
    key_padding_mask: Optional[Tensor] = None,
    eps: float = 0.1,
) -> Tensor:
    """Query i sees keys ``j <= i``; features come from ``feature_map`` on each block of rows.

    Args:
        x: ``(B, L, ...)``, what ``feature_map`` reads, rows on dim 1 (e.g. the layer input, so
            the projections are recomputed too and never stored).
        feature_map: ``(x[:, rows], rows) -> (phi_q, phi_k, v)``: features ``(N, b, f)`` and
            values ``(N, b, dv)``, or ``v=None`` when ``values`` is given.
        feature_params: the parameters ``feature_map`` uses, so they receive gradients.
        values: ``(N, L, dv)`` values that cannot be recomputed (e.g. after dropout), or None.
        chunk_size: chunk length of the causal chunked form inside a block.
        block_size: rows per recomputed block (working memory is ``O(block_size)``); a
            sequence of at most one block is computed directly, without recomputation.
        key_padding_mask: ``(N, L)`` bool, True at padding.
    Returns:
        ``(N, L, dv)``, laid out rows-outermost in memory.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    length = x.shape[1]
    if length <= block_size:
        # One block: plain autograd keeps O(block_size) intermediates anyway, and skipping the
        # recomputation halves the work on short sequences (text).
        phi_q, phi_k, v = _block_inputs(feature_map, x, values, slice(0, length))
        out, _ = causal_linear_attention(phi_q, phi_k, v, chunk_size, key_padding_mask, eps,
                                         output_final_state=False)
        return out
    return _BlockwiseCausal.apply(
        feature_map, chunk_size, block_size, key_padding_mask, eps, x, values, *feature_params
    )
