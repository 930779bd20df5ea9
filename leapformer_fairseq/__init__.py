"""LeaPformer for fairseq: LeaP linear attention for simultaneous translation.

Use with ``fairseq-train --user-dir leapformer_fairseq``. Importing the package registers the
models and makes fairseq checkpoints load under torch >= 2.6 (see
:mod:`leapformer_fairseq.compat`).
"""
from leapformer_fairseq.compat import allow_fairseq_checkpoints

allow_fairseq_checkpoints()

from leapformer_fairseq import models, ops  # noqa: E402  (models registers the architectures)
from leapformer_fairseq.modules import LeaPMultiheadAttention  # noqa: E402

__all__ = ["LeaPMultiheadAttention", "allow_fairseq_checkpoints", "models", "ops"]
