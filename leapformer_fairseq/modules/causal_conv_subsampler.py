"""``CausalConv1dSubsampler``: fairseq's convolutional subsampler, made causal and streamable."""
from typing import Dict, Optional, Sequence, Tuple

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn


@with_incremental_state
class CausalConv1dSubsampler(nn.Module):
    """A stack of stride-2 ``Conv1d`` + GLU over time whose outputs never look ahead.

    Each layer pads ``kernel - 1`` zero frames on the left only, so output ``j`` of a layer reads
    its inputs ``2j - kernel + 1 .. 2j``: ``n`` input frames give ``ceil(n / 2)`` outputs, and
    padding on the right (batches) never changes real outputs. Parameter names are those of
    fairseq's ``Conv1dSubsampler`` (``conv_layers.{i}.weight``).

    ``forward_incremental`` keeps, per layer, only the input frames a later output still needs
    (fewer than ``kernel``, in fairseq's ``incremental_state``), so pushing frames in any pieces
    gives the rows of ``forward`` on the whole sequence.

    Args:
        in_channels: feature dimension (80 for fbank).
        mid_channels: channels between layers (before GLU halves them).
        out_channels: output dimension (``d_model``).
        kernel_sizes: one kernel size per layer (each layer subsamples by 2).
    """

    stride = 2

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 kernel_sizes: Sequence[int] = (3, 3)):
        super().__init__()
        self.kernel_sizes = list(kernel_sizes)
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(
                in_channels if i == 0 else mid_channels // 2,
                mid_channels if i < len(kernel_sizes) - 1 else out_channels * 2,
                k,
                stride=self.stride,
            )
            for i, k in enumerate(kernel_sizes)
        )

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """``(B,)`` input lengths -> output lengths (``ceil(n / 2)`` per layer)."""
        for _ in self.conv_layers:
            lengths = torch.div(lengths + 1, 2, rounding_mode="floor")
        return lengths

    def forward(self, features: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """``(B, T, F)`` features and ``(B,)`` lengths -> ``(T', B, C)`` and ``(B,)`` lengths."""
        x = features.transpose(1, 2)
        for conv, kernel in zip(self.conv_layers, self.kernel_sizes):
            x = nn.functional.glu(conv(nn.functional.pad(x, (kernel - 1, 0))), dim=1)
        return x.permute(2, 0, 1).contiguous(), self.output_lengths(lengths)

    def forward_incremental(self, features: Tensor,
                            incremental_state: Dict[str, Dict[str, Optional[Tensor]]]) -> Tensor:
        """New frames ``(B, n, F)`` -> the new outputs ``(n', B, C)``.

        ``incremental_state`` (fairseq's, a dict empty at the start of a stream) holds this
        module's buffer ``pending_inputs``: per layer ``i``, ``layer_{i}`` ``(B, F_i, < kernel)``
        is the input frames a later output still needs.
        """
        buffer = self.get_incremental_state(incremental_state, "pending_inputs") or {}
        x = features.transpose(1, 2)
        for index, (conv, kernel) in enumerate(zip(self.conv_layers, self.kernel_sizes)):
            name = f"layer_{index}"
            pending = buffer.get(name)
            if pending is None:  # the left padding of the first output
                pending = x.new_zeros(x.size(0), x.size(1), kernel - 1)
            x = torch.cat([pending, x], dim=2)
            outputs = max(0, (x.size(2) - kernel) // self.stride + 1)
            buffer[name] = x[:, :, outputs * self.stride:]
            x = x[:, :, :(outputs - 1) * self.stride + kernel] if outputs else x[:, :, :0]
            x = nn.functional.glu(conv(x), dim=1) if outputs else x.new_zeros(
                x.size(0), conv.out_channels // 2, 0)
        self.set_incremental_state(incremental_state, "pending_inputs", buffer)
        return x.permute(2, 0, 1).contiguous()
