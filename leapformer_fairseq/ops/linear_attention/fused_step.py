"""The causal decode step fused into one compiled CPU op (``fused_step.cpp``), and the read of
cross-attention's source sums with it.

An eager step runs about 16 small ops (the feature maps, the LeaP MLPs, the sin/cos re-weighting,
the state update and read); on a CPU each costs more in dispatch than in arithmetic. The fused op
does the same math in one call (a read: the query's features and the read), for ReLU or
Hedgehog features, with or without LeaP's re-weighting (``linear``, ``hedgehog`` and ``leap``;
cosFormer's positions stay eager).

Which step runs is chosen by :func:`select_step_backend` from ``LEAPFORMER_STEP_BACKEND``:

- ``auto`` (default): the fused op for CPU float32/float64 steps without autograd, built on first
  use (about a minute, then cached by PyTorch under ``TORCH_EXTENSIONS_DIR``, default
  ``~/.cache/torch_extensions``); if it cannot be built, one warning and the eager ops.
- ``torch``: the eager ops always (nothing is built).
- ``cpp``: the fused op; an error where it cannot serve the step or cannot be built.
"""
import logging
import os
import shutil
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .recurrent import LinearAttentionState

logger = logging.getLogger(__name__)

STEP_BACKEND_VARIABLE = "LEAPFORMER_STEP_BACKEND"
STEP_BACKENDS = ("auto", "torch", "cpp")
SOURCE = Path(__file__).with_name("fused_step.cpp")


def quiet_cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its warning that no CUDA runtime is
    found (true and irrelevant on a CPU; the compilers here import it too)."""
    extension_logger = logging.getLogger("torch.utils.cpp_extension")
    level = extension_logger.level
    extension_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        extension_logger.setLevel(level)
    return cpp_extension


@lru_cache(maxsize=None)
def compiled_step() -> ModuleType:
    """The compiled op, built from ``fused_step.cpp`` on first use (PyTorch caches the build)."""
    cpp_extension = quiet_cpp_extension()
    if shutil.which("ninja") is None:  # PyTorch builds with ninja; pip's ninja package (a
        import ninja  # dependency) puts it beside the interpreter, off PATH outside a venv

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    logger.info("loading the fused CPU decode step (built from %s on first use, about a "
                "minute)", SOURCE)
    return cpp_extension.load(name="leapformer_fused_step", sources=[str(SOURCE)],
                              extra_cflags=["-O3"])


@lru_cache(maxsize=None)
def build_error() -> Optional[str]:
    """Why the op cannot be built or loaded here, or None once it is loaded."""
    try:
        compiled_step()
    except Exception as error:  # a compiler or header missing, a failed build: all reported
        last_line = (str(error).strip().splitlines() or [""])[-1]
        return f"{type(error).__name__}: {last_line}"
    return None


def select_step_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``cpp`` (the fused op) or ``torch`` (eager ops) for a decode step on ``device`` in
    ``dtype``, from ``LEAPFORMER_STEP_BACKEND`` (``auto``, ``torch``, ``cpp``). The fused op
    serves CPU float32/float64 steps without autograd."""
    name = os.environ.get(STEP_BACKEND_VARIABLE, "auto") or "auto"
    if name not in STEP_BACKENDS:
        raise ValueError(f"{STEP_BACKEND_VARIABLE}={name!r}: choose one of "
                         f"{', '.join(STEP_BACKENDS)}")
    if name == "torch":
        return "torch"
    serves = (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64)
              and not torch.is_grad_enabled())
    if not serves:
        if name == "cpp":
            raise ValueError(f"{STEP_BACKEND_VARIABLE}=cpp serves CPU float32/float64 decode "
                             f"steps without autograd; got {device}, {dtype}, autograd "
                             f"{'on' if torch.is_grad_enabled() else 'off'}")
        return "torch"
    error = build_error()
    if error is None:
        return "cpp"
    if name == "cpp":
        raise ValueError(f"{STEP_BACKEND_VARIABLE}=cpp: the fused step did not build ({error})")
    _warn_once(error)
    return "torch"


@lru_cache(maxsize=None)
def _warn_once(error: str) -> None:
    logger.warning("the fused CPU decode step did not build (%s); decode steps run the eager "
                   "ops (the same numbers, slower). %s=torch skips the build.", error,
                   STEP_BACKEND_VARIABLE)


def fused_recurrent_step(
    state: LinearAttentionState,
    u: Tensor,
    v: Tensor,
    layers: Dict[str, Tuple[Tensor, Tensor]],
    eps: float = 0.1,
    norm_eps: float = 1e-5,
) -> Tuple[LinearAttentionState, Tensor]:
    """One causal step from projections: the features of the new token's query and key, the
    state update ``S += phi_k^T v``, ``z += phi_k`` and the read ``phi_q S / max(phi_q . z, eps)``.

    Args:
        state: ``(N, F, dv)`` and ``(N, F)`` sums, contiguous, in ``u``'s dtype.
        u: ``(2, N, d)`` the query and key projections (any strides); v: ``(N, dv)``.
        layers: the feature map's stacked parameters by role (``LeaPMultiheadAttention.
            _side_parameters("qk")``): ``hedgehog`` (Hedgehog's features; else ReLU),
            ``norm``, ``hidden`` and ``out`` (LeaP's re-weighting; absent: none).
        norm_eps: the ``norm`` layer's epsilon.
    Returns:
        The new state and the output ``(N, dv)``, all in ``u``'s dtype.
    """
    kv, k_sum, out = _fused(state, u, v, layers, eps, norm_eps)
    return LinearAttentionState(kv, k_sum), out


def fused_query_state(
    state: LinearAttentionState,
    u: Tensor,
    layers: Dict[str, Tuple[Tensor, Tensor]],
    eps: float = 0.1,
    norm_eps: float = 1e-5,
) -> Tensor:
    """Read ``state`` with one query per row, from its projection: ``phi_q S / max(phi_q . z,
    eps)``; the state is unchanged.

    Args:
        state: ``(N, F, dv)`` and ``(N, F)`` sums, contiguous, in ``u``'s dtype.
        u: ``(N, d)`` the query projections (any strides).
        layers: the query side's stacked parameters (``_side_parameters("q")``), as in
            :func:`fused_recurrent_step`.
    Returns:
        ``(N, dv)`` in ``u``'s dtype.
    """
    return _fused(state, u.unsqueeze(0), None, layers, eps, norm_eps)[2]


def _fused(state: LinearAttentionState, u: Tensor, v: Optional[Tensor],
           layers: Dict[str, Tuple[Tensor, Tensor]], eps: float,
           norm_eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The compiled op: ``u`` of 2 sides with ``v`` (a step) or of 1 side without (a read)."""
    def pair(role: str) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        return layers.get(role, (None, None))

    return compiled_step().fused_step(state.kv, state.k_sum, u, v, *pair("hedgehog"),
                                      *pair("norm"), norm_eps, *pair("hidden"), *pair("out"),
                                      eps)
