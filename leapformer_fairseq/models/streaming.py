"""The streaming API of simultaneous models: push source, predict under wait-k, finish.

One sentence at a time (batch 1), greedy. Nothing is re-encoded: each pushed source token runs
through the causal encoder once, advancing every layer's recurrent state; encoder states become
visible to the cross-attention exactly at their wait-k boundary: target token i sees source
units ``0 .. min(i + k, S) - 1``, the same schedule as in training. A READ never
touches the decoder's state.

``recompute=True`` instead re-runs encoder and decoder over the whole prefix at every
prediction (the reference implementation's way), for comparison.
"""
from typing import List, Optional, Sequence

import torch
from torch import Tensor


def greedy_token(logits: Tensor, dictionary) -> int:
    """The most likely token other than padding (as fairseq's generator), from ``(V,)``."""
    logits = logits.clone()
    logits[dictionary.pad()] = float("-inf")
    return int(logits.argmax())


class WaitkStream:
    """Wait-k greedy decoding of one sentence through the model's incremental state.

    Args:
        model: a ``leapformer_waitk_transformer`` in eval mode.
        waitk: lagging ``k`` (default: the model's ``--waitk-lagging``).
        max_len_a, max_len_b: once the source is finished, stop (emit EOS) at
            ``max_len_a * source_units + max_len_b`` target tokens.
        recompute: re-encode and re-decode the whole prefix at every prediction.
    """

    def __init__(
        self,
        model,
        waitk: Optional[int] = None,
        max_len_a: float = 2.0,
        max_len_b: int = 10,
        recompute: bool = False,
    ):
        if model.training:
            raise ValueError("streaming needs the model in eval mode (model.eval())")
        self.model = model
        self.waitk = waitk or model.decoder.cross_attention_config.waitk_lagging
        if not self.waitk or self.waitk < 1:
            raise ValueError(f"waitk must be >= 1, got {self.waitk}")
        self.max_len_a, self.max_len_b = max_len_a, max_len_b
        self.recompute = recompute
        self.source_eos = model.encoder.dictionary.eos()
        self.target_eos = model.decoder.dictionary.eos()
        self.device = next(model.parameters()).device
        self.source: List[int] = []
        self.target: List[int] = []
        self.source_finished = False
        self.encoder_state: dict = {}
        self.decoder_state: dict = {}
        self.pending: Optional[Tensor] = None  # encoder states not yet visible, (n, 1, C)
        self.visible_units = 0
        # work counters, for tests and benchmarks: positions run through encoder / decoder
        self.encoder_positions_computed = 0
        self.decoder_positions_computed = 0

    # ---------------------------------------------------------------- source side
    @torch.no_grad()
    def push_source(self, tokens: Sequence[int]) -> None:
        """Append source tokens (no EOS); the causal encoder runs on them once."""
        if self.source_finished:
            raise RuntimeError("push_source after finish_source")
        if len(tokens) == 0:
            return
        start = len(self.source)
        self.source.extend(int(t) for t in tokens)
        if self.recompute:
            return
        new = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        states = self.model.encoder.forward_new_tokens(new, start, self.encoder_state)
        self.encoder_positions_computed += new.size(1)
        self.pending = states if self.pending is None else torch.cat([self.pending, states])

    def finish_source(self) -> None:
        """End of source: push EOS (as in training data); from now on everything is visible."""
        if not self.source_finished:
            self.push_source([self.source_eos])
            self.source_finished = True

    # ---------------------------------------------------------------- target side
    @property
    def finished(self) -> bool:
        return bool(self.target) and self.target[-1] == self.target_eos

    def ready_to_write(self) -> bool:
        """Wait-k: the next target token needs ``len(target) + k`` source units (or the end)."""
        return self.source_finished or len(self.source) >= len(self.target) + self.waitk

    @torch.no_grad()
    def predict(self) -> int:
        """Greedily predict the next target token and advance the decoder by one token."""
        if self.finished:
            raise RuntimeError("predict after EOS")
        if not self.ready_to_write():
            raise RuntimeError(f"wait-{self.waitk} needs {len(self.target) + self.waitk} source "
                               f"units, {len(self.source)} pushed: read more first")
        # the training schedule g(i) = min(i + k, source length), also after the source ended
        limit = min(len(self.target) + self.waitk, len(self.source))
        prev_tokens = torch.tensor([[self.target_eos] + self.target], device=self.device)
        if self.recompute:
            logits = self._recompute_logits(prev_tokens)
        else:
            logits = self._incremental_logits(prev_tokens, limit)
        token = greedy_token(logits, self.model.decoder.dictionary)
        if self.source_finished and len(self.target) + 1 >= (
            self.max_len_a * len(self.source) + self.max_len_b
        ):
            token = self.target_eos
        self.target.append(token)
        return token

    def _incremental_logits(self, prev_tokens: Tensor, limit: int) -> Tensor:
        reveal = limit - self.visible_units
        if reveal > 0:
            self.model.decoder.extend_source(self.decoder_state, self.pending[:reveal])
            self.pending = self.pending[reveal:]
            self.visible_units = limit
        # the cross-attention reads its extended state; encoder_out only carries the width
        encoder_out = {"encoder_out": [self.pending.new_zeros(1, 1, self.pending.size(-1))],
                       "encoder_padding_mask": []}
        logits, _ = self.model.decoder(prev_tokens, encoder_out=encoder_out,
                                       incremental_state=self.decoder_state)
        self.decoder_positions_computed += 1
        return logits[0, -1]

    def _recompute_logits(self, prev_tokens: Tensor) -> Tensor:
        source = torch.tensor([self.source], device=self.device)
        lengths = torch.tensor([source.size(1)], device=self.device)
        encoder_out = self.model.encoder(source, src_lengths=lengths)
        logits, _ = self.model.decoder(prev_tokens, encoder_out=encoder_out)
        self.encoder_positions_computed += source.size(1)
        self.decoder_positions_computed += prev_tokens.size(1)
        return logits[0, -1]


@torch.no_grad()
def waitk_greedy_decode(
    model, source: Sequence[int], max_len_a: float = 2.0, max_len_b: int = 10
) -> List[int]:
    """Offline wait-k greedy decoding: the whole source (with EOS) is known, and every step is a
    full parallel forward whose cross-attention limits follow the wait-k schedule. The
    reference that streaming must reproduce token for token."""
    eos = model.decoder.dictionary.eos()
    device = next(model.parameters()).device
    tokens = torch.tensor([list(source) + [model.encoder.dictionary.eos()]], device=device)
    lengths = torch.tensor([tokens.size(1)], device=device)
    encoder_out = model.encoder(tokens, src_lengths=lengths)
    target: List[int] = []
    while not target or target[-1] != eos:
        prev_tokens = torch.tensor([[eos] + target], device=device)
        logits, _ = model.decoder(prev_tokens, encoder_out=encoder_out)
        token = greedy_token(logits[0, -1], model.decoder.dictionary)
        if len(target) + 1 >= max_len_a * tokens.size(1) + max_len_b:
            token = eos
        target.append(token)
    return target


def load_streaming_model(checkpoint: str, data_bin: Optional[str] = None, device: str = "cpu"):
    """Load a trained wait-k checkpoint for streaming: ``(model in eval mode, task)``.

    ``data_bin`` overrides the checkpoint's data directory (it only needs the dictionaries).
    """
    from fairseq import checkpoint_utils

    overrides = {} if data_bin is None else {"data": data_bin}
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint],
                                                                   arg_overrides=overrides)
    model = models[0]
    if not hasattr(model, "start_stream"):
        raise ValueError(f"{checkpoint} holds a {type(model).__name__}, not a simultaneous "
                         "model (train with --arch leapformer_waitk_transformer*)")
    return model.to(device).eval(), task
