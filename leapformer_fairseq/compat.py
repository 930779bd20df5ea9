"""Make fairseq checkpoints load under torch >= 2.6.

torch 2.6 made ``torch.load`` default to ``weights_only=True``, which refuses the
``argparse.Namespace`` and omegaconf objects every fairseq checkpoint holds, so
``fairseq-generate`` and ``--restore-file`` fail. Importing this plugin (``--user-dir`` does)
points the modules of fairseq that read its own checkpoints at a ``torch`` whose ``load``
defaults to ``weights_only=False``. ``torch.load`` itself, and every other caller, is untouched.
"""
import importlib
from types import ModuleType
from typing import Any

import torch

# fairseq modules that unpickle fairseq's own files with ``torch.load``.
CHECKPOINT_READERS = ("fairseq.checkpoint_utils", "fairseq.distributed.utils")


class _TorchForFairseqCheckpoints:
    """Forwards every attribute to ``torch``; ``load`` defaults to ``weights_only=False``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(f, *args, **kwargs)


def allow_fairseq_checkpoints() -> None:
    """Install the shim in each fairseq module of :data:`CHECKPOINT_READERS` (idempotent)."""
    for name in CHECKPOINT_READERS:
        module: ModuleType = importlib.import_module(name)
        if not isinstance(module.torch, _TorchForFairseqCheckpoints):
            module.torch = _TorchForFairseqCheckpoints()
