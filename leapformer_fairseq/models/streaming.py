"""The streaming API of simultaneous models: push source, predict under wait-k, finish.

One sentence (or utterance) at a time, batch 1, greedy. Nothing is re-encoded: each pushed source
token (text) or audio sample (speech) runs through the causal encoder once, advancing every layer's
recurrent state; encoder states become visible to the cross-attention exactly at their wait-k
boundary. With ``frames_per_unit`` encoder states per source unit (1 for text,
``--frames-per-unit`` for speech), target token i sees the first
``min((i + k) * frames_per_unit, S)`` encoder states, S those encoded so far: the schedule of
training. A READ never touches the decoder's state.

``recompute=True`` instead re-runs encoder and decoder over the whole prefix at every prediction
(the reference implementation's way), for comparison.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import yaml
from fairseq.modules import LearnedPositionalEmbedding
from torch import Tensor

from leapformer_fairseq.audio import GlobalCMVN, IncrementalFbank, check_finite, fbank, num_frames


class RefusedInput(SystemExit, ValueError):
    """An input the streaming side cannot use. A ``ValueError`` to callers that catch it; left
    uncaught (in an agent under the ``simuleval`` CLI) it ends the process with its one-line
    message instead of a traceback."""


def greedy_token(logits: Tensor, dictionary, allow_eos: bool = True) -> int:
    """The most likely token other than padding (as fairseq's generator), and other than EOS
    unless ``allow_eos``, from ``(V,)``."""
    logits = logits.clone()
    logits[dictionary.pad()] = float("-inf")
    if not allow_eos:
        logits[dictionary.eos()] = float("-inf")
    return int(logits.argmax())


def stream_waitk(model, waitk: Optional[int]) -> int:
    """The k to decode ``model`` with: ``waitk``, else the model's ``--waitk-lagging``. A
    multi-path model serves several k and has no default: :class:`RefusedInput` naming them
    (an agent without ``--waitk`` stops with that line)."""
    cross = model.decoder.cross_attention_config
    if waitk is None and cross.waitk_train_lags:
        raise RefusedInput(f"the model was trained for every k in {list(cross.waitk_train_lags)} "
                           "(multi-path wait-k); give the k to decode with (the agents' --waitk)")
    if waitk is None:
        waitk = cross.waitk_lagging
    if waitk < 1:
        raise ValueError(f"waitk must be >= 1, got {waitk}")
    return waitk


def eos_allowed(position: int, waitk: int, frames_per_unit: int, source_frames: Optional[int],
                eos_before_end: bool) -> bool:
    """May target token ``position`` be EOS? Always with ``eos_before_end``; otherwise only once
    its wait-k window ``(position + k) * frames_per_unit`` covers the whole source of
    ``source_frames`` encoder states (``None``: the source is not finished, so its length is
    unknown)."""
    if eos_before_end:
        return True
    return source_frames is not None and (position + waitk) * frames_per_unit >= source_frames


class _WaitkDecoding:
    """The target side shared by text and speech streams: wait-k schedule, greedy steps through
    the decoder's incremental state, work counters.

    Subclasses encode the source and keep ``self.pending`` (encoder states ``(n, 1, C)`` not yet
    visible), ``self.encoded`` (encoder states computed so far) and ``_source_units()``.
    """

    def __init__(self, model, waitk: Optional[int], frames_per_unit: int, max_len_a: float,
                 max_len_b: int, recompute: bool, eos_before_end: bool):
        if model.training:
            raise ValueError("streaming needs the model in eval mode (model.eval())")
        self.model = model
        self.waitk = stream_waitk(model, waitk)
        self.frames_per_unit = frames_per_unit
        self.max_len_a, self.max_len_b = max_len_a, max_len_b
        self.recompute = recompute
        self.eos_before_end = eos_before_end
        self.target_eos = model.decoder.dictionary.eos()
        positions = model.decoder.embed_positions  # learned ones have no row past their limit
        self.max_target_positions = positions.max_positions \
            if isinstance(positions, LearnedPositionalEmbedding) else None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.target: List[int] = []
        # [EOS] + target, in a buffer that grows by doubling: no per-token rebuild
        self.prev_tokens = torch.full((1, 64), self.target_eos, dtype=torch.long,
                                      device=self.device)
        self.source_finished = False
        self.encoder_state: Dict = {}
        self.decoder_state: Dict = {}
        self.pending: Optional[Tensor] = None
        # the encoder_out of incremental decoder calls (built once): carries only the width
        self.width_only: Optional[Dict] = None
        self.encoded = 0
        self.visible = 0
        # work counters, for tests and benchmarks: positions run through encoder / decoder
        self.encoder_positions_computed = 0
        self.decoder_positions_computed = 0

    def _source_units(self) -> int:
        raise NotImplementedError

    def _encoder_frames(self) -> int:
        """Encoder states of the source read so far (computed, or to compute in recompute
        mode)."""
        raise NotImplementedError

    def _recompute_encoder_out(self) -> Dict:
        raise NotImplementedError

    def _append_encoded(self, states: Tensor) -> None:
        self.encoded += states.size(0)
        self.encoder_positions_computed += states.size(0)
        self.pending = states if self.pending is None else torch.cat([self.pending, states])

    @property
    def finished(self) -> bool:
        return bool(self.target) and self.target[-1] == self.target_eos

    def ready_to_write(self) -> bool:
        """Wait-k: the next target token needs ``len(target) + k`` source units (or the end)."""
        return self.source_finished or self._source_units() >= len(self.target) + self.waitk

    @torch.no_grad()
    def predict(self) -> int:
        """Greedily predict the next target token and advance the decoder by one token."""
        if self.finished:
            raise RuntimeError("predict after EOS")
        if not self.ready_to_write():
            raise RuntimeError(f"wait-{self.waitk} needs {len(self.target) + self.waitk} source "
                               f"units, {self._source_units()} read: read more first")
        if self.source_finished and self._source_units() == 0:
            # a source too short for one encoder state translates to nothing
            self._append_target(self.target_eos)
            return self.target_eos
        if self.max_target_positions is not None and \
                len(self.target) >= self.max_target_positions:
            raise ValueError(f"target position {len(self.target)} is past --max-target-positions "
                             f"{self.max_target_positions} (learned positional embeddings)")
        prev_tokens = self.prev_tokens[:, :len(self.target) + 1]
        if self.recompute:
            encoder_out = self._recompute_encoder_out()
            with self.model.decoder.lagging(self.waitk):
                logits, _ = self.model.decoder(prev_tokens, encoder_out=encoder_out)
            self.decoder_positions_computed += prev_tokens.size(1)
            logits = logits[0, -1]
        else:
            logits = self._incremental_logits(prev_tokens)
        source_frames = self._encoder_frames() if self.source_finished else None
        allow_eos = eos_allowed(len(self.target), self.waitk, self.frames_per_unit,
                                source_frames, self.eos_before_end)
        token = greedy_token(logits, self.model.decoder.dictionary, allow_eos)
        if self.source_finished and len(self.target) + 1 >= (
            self.max_len_a * self._source_units() + self.max_len_b
        ):
            token = self.target_eos
        self._append_target(token)
        return token

    def _append_target(self, token: int) -> None:
        """Append ``token`` to ``target`` and to the ``prev_tokens`` buffer."""
        self.target.append(token)
        if len(self.target) >= self.prev_tokens.size(1):
            self.prev_tokens = torch.cat([self.prev_tokens, torch.full_like(self.prev_tokens,
                                                                            self.target_eos)], 1)
        self.prev_tokens[0, len(self.target)] = token

    def _incremental_logits(self, prev_tokens: Tensor) -> Tensor:
        # the training schedule: min((i + k) * frames_per_unit, encoded), also after the
        # source ended
        limit = min((len(self.target) + self.waitk) * self.frames_per_unit, self.encoded)
        reveal = limit - self.visible
        if reveal > 0:
            self.model.decoder.extend_source(self.decoder_state, self.pending[:reveal])
            self.pending = self.pending[reveal:]
            self.visible = limit
        # the cross-attention reads its extended state; encoder_out only carries the width
        if self.width_only is None:
            width = self.pending.size(-1)
            self.width_only = {"encoder_out": [self.pending.new_zeros(1, 1, width)],
                               "encoder_padding_mask": []}
        encoder_out = self.width_only
        logits, _ = self.model.decoder(prev_tokens, encoder_out=encoder_out,
                                       incremental_state=self.decoder_state)
        self.decoder_positions_computed += 1
        return logits[0, -1]


class WaitkStream(_WaitkDecoding):
    """Wait-k greedy decoding of one sentence of source tokens (text).

    Args:
        model: a ``leapformer_waitk_transformer`` in eval mode.
        waitk: lagging ``k`` (default: the model's ``--waitk-lagging``).
        max_len_a, max_len_b: once the source is finished, stop (emit EOS) at
            ``max_len_a * source_tokens + max_len_b`` target tokens.
        recompute: re-encode and re-decode the whole prefix at every prediction.
        eos_before_end: allow EOS before the token's wait-k window covers the whole source.
    """

    def __init__(self, model, waitk: Optional[int] = None, max_len_a: float = 2.0,
                 max_len_b: int = 10, recompute: bool = False, eos_before_end: bool = True):
        super().__init__(model, waitk, 1, max_len_a, max_len_b, recompute, eos_before_end)
        self.source_eos = model.encoder.dictionary.eos()
        self.source_length = 0
        self.source: List[int] = []  # kept in recompute mode only

    def _source_units(self) -> int:
        return self.source_length

    def _encoder_frames(self) -> int:
        return self.source_length

    @torch.no_grad()
    def push_source(self, tokens: Sequence[int]) -> None:
        """Append source tokens (no EOS); the causal encoder runs on them once."""
        if self.source_finished:
            raise RuntimeError("push_source after finish_source")
        if len(tokens) == 0:
            return
        if self.recompute:
            self.source.extend(int(t) for t in tokens)
        else:  # counted once encoded: a refused push (e.g. past the positions) reads nothing
            new = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
            self._append_encoded(self.model.encoder.forward_new_tokens(
                new, self.source_length, self.encoder_state))
        self.source_length += len(tokens)

    def finish_source(self) -> None:
        """End of source: push EOS (as in training data); from now on everything is visible."""
        if not self.source_finished:
            self.push_source([self.source_eos])
            self.source_finished = True

    def _recompute_encoder_out(self) -> Dict:
        source = torch.tensor([self.source], device=self.device)
        lengths = torch.tensor([source.size(1)], device=self.device)
        self.encoder_positions_computed += source.size(1)
        return self.model.encoder(source, src_lengths=lengths)


class SpeechWaitkStream(_WaitkDecoding):
    """Wait-k greedy decoding of one utterance pushed as audio samples.

    Each push computes fbank on the new samples only (the window overlap carried), applies
    CMVN, and advances the causal subsampler and every encoder layer by the new frames only.
    A source unit is ``--frames-per-unit`` encoder frames.

    Args:
        model: a ``leapformer_s2t_waitk`` in eval mode.
        cmvn: the global CMVN of the training features (``None``: features are not normalised).
        waitk: lagging ``k`` in units (default: the model's ``--waitk-lagging``).
        max_len_a, max_len_b: once the source is finished, stop (emit EOS) at
            ``max_len_a * source_units + max_len_b`` target tokens.
        recompute: at every prediction, recompute fbank, encoder and decoder over the whole
            prefix (the reference implementation's re-encoding).
        eos_before_end: allow EOS before the token's wait-k window covers the whole utterance
            (default False: an undertrained or a long-stream model would otherwise stop early
            and ignore the rest of the audio).
    """

    def __init__(self, model, cmvn: Optional[GlobalCMVN] = None, waitk: Optional[int] = None,
                 max_len_a: float = 3.0, max_len_b: int = 10, recompute: bool = False,
                 eos_before_end: bool = False):
        super().__init__(model, waitk, model.decoder.cross_attention_config.frames_per_unit,
                         max_len_a, max_len_b, recompute, eos_before_end)
        self.cmvn = cmvn
        self.fbank = IncrementalFbank()
        self.samples: List[Tensor] = []  # kept in recompute mode only
        self.samples_pushed = 0

    def _encoder_frames(self) -> int:
        if not self.recompute:
            return self.encoded
        fbank_frames = torch.tensor(num_frames(self.samples_pushed))
        return int(self.model.encoder.subsampler.output_lengths(fbank_frames))

    def _source_units(self) -> int:
        frames = self._encoder_frames()
        units = frames // self.frames_per_unit
        return units + (1 if self.source_finished and frames % self.frames_per_unit else 0)

    def _normalise(self, features: Tensor) -> Tensor:
        """CMVN, then the model's device and dtype."""
        features = features if self.cmvn is None else self.cmvn(features)
        return features.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def push_audio(self, samples: Tensor) -> None:
        """Append ``(n,)`` int16-scale samples at 16 kHz (see ``audio.to_int16_scale``)."""
        if self.source_finished:
            raise RuntimeError("push_audio after finish_source")
        try:
            check_finite(samples, "push_audio")
        except ValueError as error:
            raise RefusedInput(str(error)) from None
        self.samples_pushed += samples.numel()
        if self.recompute:
            self.samples.append(samples.reshape(-1).float())
            return
        features = self._normalise(self.fbank.push(samples))
        if features.size(0) == 0:
            return
        states = self.model.encoder.forward_new_frames(features.unsqueeze(0), self.encoder_state)
        if states.size(0):
            self._append_encoded(states)

    def finish_source(self) -> None:
        """End of the utterance: a unit-causal encoder encodes its last, incomplete unit;
        every encoder state is now readable by the schedule."""
        if not self.source_finished and not self.recompute:
            states = self.model.encoder.finish_stream(self.encoder_state)
            if states is not None:
                self._append_encoded(states)
        self.source_finished = True

    def _recompute_encoder_out(self) -> Dict:
        samples = torch.cat(self.samples) if self.samples else torch.zeros(0)
        features = self._normalise(fbank(samples))
        encoder_out = self.model.encoder(
            features.unsqueeze(0), torch.tensor([features.size(0)], device=self.device))
        self.encoder_positions_computed += encoder_out["encoder_out"][0].size(0)
        return encoder_out


@torch.no_grad()
def greedy_decode_from_encoder_out(model, encoder_out: Dict, source_units: int,
                                   max_len_a: float, max_len_b: int, eos_before_end: bool,
                                   waitk: Optional[int] = None) -> List[int]:
    """Offline wait-k greedy decoding from a full ``encoder_out``: every step is a full parallel
    decoder forward whose cross-attention limits follow the wait-k schedule of training, at
    ``waitk`` (default: the model's k; a multi-path model needs it). The reference that
    streaming must reproduce token for token."""
    eos = model.decoder.dictionary.eos()
    device = next(model.parameters()).device
    cross = model.decoder.cross_attention_config
    waitk = stream_waitk(model, waitk)
    source_frames = encoder_out["encoder_out"][0].size(0)
    target: List[int] = []
    while not target or target[-1] != eos:
        prev_tokens = torch.tensor([[eos] + target], device=device)
        with model.decoder.lagging(waitk):
            logits, _ = model.decoder(prev_tokens, encoder_out=encoder_out)
        allow_eos = eos_allowed(len(target), waitk, cross.frames_per_unit, source_frames,
                                eos_before_end)
        token = greedy_token(logits[0, -1], model.decoder.dictionary, allow_eos)
        if len(target) + 1 >= max_len_a * source_units + max_len_b:
            token = eos
        target.append(token)
    return target


@torch.no_grad()
def waitk_greedy_decode(
    model, source: Sequence[int], max_len_a: float = 2.0, max_len_b: int = 10,
    eos_before_end: bool = True, waitk: Optional[int] = None,
) -> List[int]:
    """Offline wait-k greedy decoding of a text source (token ids without EOS), at ``waitk``
    (default: the model's k)."""
    device = next(model.parameters()).device
    tokens = torch.tensor([list(source) + [model.encoder.dictionary.eos()]], device=device)
    encoder_out = model.encoder(tokens, src_lengths=torch.tensor([tokens.size(1)], device=device))
    return greedy_decode_from_encoder_out(model, encoder_out, tokens.size(1), max_len_a,
                                          max_len_b, eos_before_end, waitk)


@torch.no_grad()
def speech_waitk_greedy_decode(
    model, samples: Tensor, cmvn: Optional[GlobalCMVN] = None, max_len_a: float = 3.0,
    max_len_b: int = 10, eos_before_end: bool = False,
) -> List[int]:
    """Offline wait-k greedy decoding of a whole utterance ``(N,)`` (int16-scale samples):
    fbank of the whole audio, parallel encoder, then :func:`greedy_decode_from_encoder_out`."""
    parameter = next(model.parameters())
    device = parameter.device
    features = fbank(samples)
    if cmvn is not None:
        features = cmvn(features)
    features = features.to(device=device, dtype=parameter.dtype)
    if features.size(0) == 0:  # too short for one frame: translates to nothing
        return [model.decoder.dictionary.eos()]
    encoder_out = model.encoder(features.unsqueeze(0),
                                torch.tensor([features.size(0)], device=device))
    frames = encoder_out["encoder_out"][0].size(0)
    units = -(-frames // model.decoder.cross_attention_config.frames_per_unit)
    return greedy_decode_from_encoder_out(model, encoder_out, units, max_len_a, max_len_b,
                                          eos_before_end)


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise RefusedInput(f"{what} not found: {path}")
    return path


def _check_data_files(task_cfg) -> None:
    """Refuse, naming the file, a data directory without what the checkpoint's task reads:
    the dictionaries (translation) or the data config and the files it names (speech)."""
    if task_cfg._name == "translation":
        from fairseq.data.data_utils import infer_language_pair

        data = task_cfg.data.split(":")[0]  # fairseq reads the dictionaries of the first shard
        if not Path(data).is_dir():
            raise RefusedInput(f"data directory not found: {data}")
        langs = (task_cfg.source_lang, task_cfg.target_lang)
        if None in langs:  # fairseq infers the pair from the file names
            langs = infer_language_pair(data)
        if None in langs:
            raise RefusedInput(f"no fairseq data (train.<src>-<tgt>.<lang>.idx) in {data}")
        for lang in langs:
            _require_file(Path(data) / f"dict.{lang}.txt", "dictionary")
        return
    if task_cfg._name != "speech_to_text":
        return
    config_path = _require_file(Path(task_cfg.data) / task_cfg.config_yaml, "data config YAML")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise RefusedInput(f"{config_path}: not a readable YAML data config ({error})".replace(
            "\n", " ")) from None
    # (what, the key, whether it is required): agents need the SentencePiece model too
    for what, key, required in (("vocabulary", "vocab_filename", True),
                                ("SentencePiece model", "bpe_tokenizer.sentencepiece_model", True),
                                ("global CMVN statistics", "global_cmvn.stats_npz_path", False)):
        section, _, name = key.rpartition(".")
        value = (config.get(section) or {}).get(name) if section else config.get(name)
        if value is None:
            if required:
                raise RefusedInput(f"{config_path}: no {key} ({what})")
            continue
        path = Path(value) if Path(value).is_absolute() else config_path.parent / value
        _require_file(path, f"{what} ({key} of {config_path})")


def load_streaming_model(checkpoint: str, data_bin: Optional[str] = None, device: str = "cpu",
                         overrides: Optional[Dict] = None):
    """Load a trained simultaneous checkpoint for streaming: ``(model in eval mode, task)``.

    ``data_bin`` overrides the checkpoint's data directory (it only needs the dictionaries,
    or for speech the data config); ``overrides`` adds more fairseq argument overrides.
    A missing, unreadable or offline checkpoint and a data directory without the files the
    task reads raise :class:`RefusedInput` naming the file.
    """
    from fairseq import checkpoint_utils

    arg_overrides = dict(overrides or {})
    if data_bin is not None:
        arg_overrides["data"] = data_bin
    _require_file(Path(checkpoint), "checkpoint")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint, arg_overrides)
        task_cfg = state["cfg"].task
    except Exception as error:  # torch, pickle and fairseq each fail their own way
        raise RefusedInput(f"{checkpoint}: not a readable fairseq checkpoint "
                           f"({type(error).__name__}: {error})".replace("\n", " ")) from None
    _check_data_files(task_cfg)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [checkpoint], arg_overrides=arg_overrides, state=state)
    model = models[0]
    if not hasattr(model, "start_stream"):
        raise RefusedInput(f"{checkpoint} holds a {type(model).__name__}, not a simultaneous "
                           "model (train with --arch leapformer_waitk_transformer* or "
                           "leapformer_s2t_waitk*)")
    return model.to(device).eval(), task
