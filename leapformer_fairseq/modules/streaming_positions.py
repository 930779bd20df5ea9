"""Sinusoidal positions for streams: the rows needed are computed, no table is grown.

fairseq's ``SinusoidalPositionalEmbedding`` keeps a table of rows and rebuilds all of it, to the
new length, whenever a call reaches past its end; in incremental decoding that happens at every
step once a stream passes the table's initial size (``--max-*-positions``).
"""
import math
from typing import Any, Optional

import torch
from fairseq.modules import SinusoidalPositionalEmbedding
from torch import Tensor


def sinusoidal_rows(positions: Tensor, embedding_dim: int, padding_idx: int) -> Tensor:
    """fairseq's sinusoidal embeddings of token positions ``(n,)`` (0 for the first token),
    ``(n, embedding_dim)`` float32 on the CPU, without the rows before them.

    Position ``t`` is row ``padding_idx + 1 + t`` of ``SinusoidalPositionalEmbedding``'s table;
    the arithmetic is ``get_embedding``'s, step for step, so the rows equal it bit for bit
    (``get_embedding`` itself can only build a table from row 0).
    """
    half_dim = embedding_dim // 2
    frequencies = torch.exp(
        torch.arange(half_dim, dtype=torch.float) * -(math.log(10000) / (half_dim - 1)))
    rows = (positions.cpu() + padding_idx + 1).to(torch.float)
    angles = rows.unsqueeze(1) * frequencies.unsqueeze(0)
    embeddings = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        embeddings = torch.cat([embeddings, torch.zeros(embeddings.size(0), 1)], dim=1)
    return embeddings


def sinusoidal_embeddings(module: SinusoidalPositionalEmbedding, positions: Tensor) -> Tensor:
    """The embeddings of token positions ``(n,)`` (CPU, 0 for the first token), ``(n, C)`` on
    ``module``'s device: rows of its table where the table has them (as fairseq reads them),
    :func:`sinusoidal_rows` past its end. The table never grows."""
    rows = positions + module.padding_idx + 1
    if int(rows.max()) < module.weights.size(0):
        return module.weights[rows.to(module.weights.device)]
    return sinusoidal_rows(positions, module.embedding_dim, module.padding_idx).to(module.weights)


class StreamingSinusoidalPositionalEmbedding(SinusoidalPositionalEmbedding):
    """fairseq's sinusoidal positional embedding whose incremental step reads or computes its one
    row (:func:`sinusoidal_embeddings`) instead of growing the table to the step's position;
    parallel calls are fairseq's. No parameters, so checkpoints are unchanged."""

    def forward(self, input: Tensor, incremental_state: Optional[Any] = None,
                timestep: Optional[Tensor] = None, positions: Optional[Any] = None) -> Tensor:
        """``(B, L)`` tokens -> ``(B, L, C)``, or ``(B, 1, C)`` for the last position in an
        incremental step (position ``timestep``, default ``L - 1``)."""
        if incremental_state is None or self.onnx_trace:
            return super().forward(input, incremental_state, timestep, positions)
        position = input.size(1) - 1 if timestep is None else int(timestep.view(-1)[0])
        row = sinusoidal_embeddings(self, torch.tensor([position]))
        return row.unsqueeze(0).expand(input.size(0), 1, -1)
