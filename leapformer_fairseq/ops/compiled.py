"""A function run through ``torch.compile`` on first use, and eagerly where compilation fails.

Used for the feature maps of training passes (``LeaPMultiheadAttention``'s
``compile_feature_map``): the relu/Hedgehog features, LeaP's MLPs and the sin/cos re-weighting
are a dozen small elementwise ops and products per call, which the compiler fuses.
"""
import logging
from typing import Callable, Generic, Optional, TypeVar

import torch

from .linear_attention.fused_step import quiet_cpp_extension

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


class Compiled(Generic[Result]):
    """``function`` through ``torch.compile(dynamic=True)`` (sizes are symbolic, so new
    lengths and batch sizes seldom compile again), compiled on the first call. If compilation
    fails (no C++ compiler for a CPU, no Triton for a GPU, an op the compiler cannot take), one
    warning naming ``option`` and the error, and ``function`` itself from then on: the same
    numbers, slower.

    ``recompile_limit``: the graphs PyTorch may compile for ``function`` (its own limit, 8, is
    for every function alike; past it PyTorch warns and runs the function eagerly)."""

    def __init__(self, function: Callable[..., Result], option: str, recompile_limit: int = 8):
        self.function = function
        self.option = option
        self.recompile_limit = recompile_limit
        self.error: Optional[str] = None
        self._compiled: Optional[Callable[..., Result]] = None

    def __call__(self, *args, **kwargs) -> Result:
        if self.error is None:
            if self._compiled is None:
                quiet_cpp_extension()
                self._compiled = torch.compile(self.function, dynamic=True)
            try:
                with torch._dynamo.config.patch(recompile_limit=self.recompile_limit):
                    return self._compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as error:
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                # "backend='inductor' raised:" and the like introduce the reason on the next line
                reason = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1])
                self.error = f"{type(error).__name__}: {reason}"
                logger.warning("%s: torch.compile failed (%s); %s runs eagerly from now on "
                               "(the same numbers, slower)", self.option, self.error,
                               getattr(self.function, "__qualname__", self.function))
        return self.function(*args, **kwargs)
