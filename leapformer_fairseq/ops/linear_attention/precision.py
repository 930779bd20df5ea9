"""Precision of every form (docs/math.md §3): sums over keys accumulate in at least float32.

fp16/bf16 inputs (or autocast) would otherwise round every sum to 8-11 bits and overflow fp16
once a denominator ``sum_j s_ij`` passes 65504.
"""
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial, reduce
from typing import Callable, Iterator

import torch
from torch import Tensor


def state_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: at least float32."""
    return torch.promote_types(input_dtype, torch.float32)


def input_dtype(*inputs: Tensor) -> torch.dtype:
    """The promoted dtype of ``inputs``: the dtype a form's output comes back in."""
    return reduce(torch.promote_types, (x.dtype for x in inputs))


def current_autocast(device_type: str) -> Callable[[], AbstractContextManager]:
    """A factory of contexts that re-enter the autocast state ``device_type`` has now (no-ops
    where the device has no autocast, e.g. ``meta``)."""
    if not torch.amp.is_autocast_available(device_type):
        return nullcontext
    return partial(torch.autocast, device_type, dtype=torch.get_autocast_dtype(device_type),
                   enabled=torch.is_autocast_enabled(device_type),
                   cache_enabled=torch.is_autocast_cache_enabled())


@contextmanager
def accumulating(*inputs: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Yield ``inputs`` cast to :func:`state_dtype` of their promoted dtype, with autocast off.

    Autocast would run the matmuls of the block in fp16/bf16 again; it is off on the inputs'
    device for the block only.
    """
    dtype = state_dtype(input_dtype(*inputs))
    device_type = inputs[0].device.type
    autocast_off = (torch.autocast(device_type, enabled=False)
                    if torch.amp.is_autocast_available(device_type)
                    and torch.is_autocast_enabled(device_type) else nullcontext())
    with autocast_off:
        yield tuple(x if x.dtype == dtype else x.to(dtype) for x in inputs)
