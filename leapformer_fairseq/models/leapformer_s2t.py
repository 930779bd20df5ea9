"""Registered speech-to-text models with LeaP attention.

``leapformer_s2t_transformer``: offline; fairseq's 2 x Conv1d stride-2 subsampler, then a LeaP
encoder (bidirectional) and decoder.
``leapformer_s2t_waitk``: simultaneous; a causal subsampler that keeps its own left context, a
causal LeaP encoder, and wait-k cross-attention on source units of ``--frames-per-unit``
encoder frames: target token i sees encoder frames ``0 .. (i + k) * frames_per_unit - 1``
in training exactly as in streaming
(:class:`~leapformer_fairseq.models.streaming.SpeechWaitkStream`).
"""
import argparse
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.data.data_utils import infer_language_pair, lengths_to_padding_mask
from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.models import (
    FairseqEncoder,
    FairseqEncoderDecoderModel,
    register_model,
    register_model_architecture,
)
from fairseq.models.speech_to_text.modules.convolution import Conv1dSubsampler
from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerModel
from fairseq.models.speech_to_text.s2t_transformer import base_architecture as s2t_base
from fairseq.models.transformer import Embedding, TransformerConfig
from fairseq.modules import FairseqDropout, LayerNorm, PositionalEmbedding
from torch import Tensor, nn

from leapformer_fairseq.audio import GlobalCMVN
from leapformer_fairseq.compat import as_namespace, record_initialisation
from leapformer_fairseq.modules.causal_conv_subsampler import CausalConv1dSubsampler

from .attention_config import (
    AttentionConfig,
    add_attention_args,
    attention_config,
    check_positive,
    positive,
)
from .leapformer_transformer import (
    LeaPAttentionBlocks,
    LeaPEncoderLayer,
    _wrap_layer,
    check_waitk_lagging,
    stream_position_rows,
    waitk_cross_attention,
    waitk_lagging_value,
)
from .streaming import SpeechWaitkStream

logger = logging.getLogger(__name__)


@with_incremental_state
class LeaPS2TEncoder(FairseqEncoder):
    """Subsampler, scaled input + sinusoidal positions, LeaP encoder layers, final layer norm.

    Input ``(B, T, 80)`` features with ``(B,)`` lengths (right padding); output fairseq's
    encoder dict with ``encoder_out = [(T', B, C)]``.
    """

    def __init__(self, cfg: TransformerConfig, self_attention: AttentionConfig,
                 subsampler: nn.Module):
        super().__init__(None)
        self.self_attention_config = self_attention
        self.subsampler = subsampler
        self.dropout_module = FairseqDropout(p=cfg.dropout, module_name=type(self).__name__)
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(cfg.encoder.embed_dim)
        self.padding_idx = 1
        self.embed_positions = PositionalEmbedding(
            cfg.max_source_positions, cfg.encoder.embed_dim, self.padding_idx
        )
        self.layers = nn.ModuleList(
            _wrap_layer(LeaPEncoderLayer(cfg, self_attention), cfg)
            for _ in range(cfg.encoder.layers)
        )
        self.layer_norm = LayerNorm(cfg.encoder.embed_dim) if cfg.encoder.normalize_before \
            else None

    def forward(self, src_tokens: Tensor, src_lengths: Tensor, return_all_hiddens: bool = False):
        x, lengths = self.subsampler(src_tokens, src_lengths)
        padding_mask = lengths_to_padding_mask(lengths)
        x = self.embed_scale * x + self.embed_positions(padding_mask).transpose(0, 1)
        x = self.dropout_module(x)
        states = []
        for layer in self.layers:
            x = layer(x, padding_mask if padding_mask.any() else None)
            if return_all_hiddens:
                states.append(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return {
            "encoder_out": [x],
            "encoder_padding_mask": [padding_mask] if padding_mask.any() else [],
            "encoder_embedding": [],
            "encoder_states": states,
            "src_tokens": [],
            "src_lengths": [],
        }

    def forward_new_frames(self, features: Tensor, incremental_state: Dict) -> Tensor:
        """Encode new feature frames ``(B, n, 80)`` of a stream: the causal subsampler and every
        layer advance their state in ``incremental_state`` by the new frames only.

        Returns the new encoder states ``(n', B, C)`` (``n'`` about ``n / 4``), equal to the
        matching rows of ``forward`` on the whole stream. The encoder's own buffer
        (``stream``) holds the count of frames encoded, ``(1,)``, and, unit-causal, the
        frames of the incomplete unit, ``(< frames_per_unit, B, C)``.
        """
        if not self.self_attention_config.causal:
            raise ValueError("streaming needs a causal encoder (leapformer_s2t_waitk)")
        if not isinstance(self.subsampler, CausalConv1dSubsampler):
            raise ValueError("streaming needs the causal subsampler (leapformer_s2t_waitk)")
        x = self.subsampler.forward_incremental(features, incremental_state)
        attention = self.self_attention_config
        if attention.unit_causal:  # a unit's frames are encoded once the unit is complete
            buffer = self._stream_buffer(incremental_state)
            waiting = buffer.get("frames_waiting")
            x = x if waiting is None else torch.cat([waiting, x])
            whole = x.size(0) // attention.frames_per_unit * attention.frames_per_unit
            buffer["frames_waiting"] = x[whole:]
            self.set_incremental_state(incremental_state, "stream", buffer)
            x = x[:whole]
        return self._encode_frames(x, incremental_state)

    def finish_stream(self, incremental_state: Dict) -> Optional[Tensor]:
        """End of a stream: encode the frames of a last, incomplete unit (unit-causal
        encoders); ``(n, B, C)``, or ``None`` when no frame is waiting."""
        buffer = self._stream_buffer(incremental_state)
        waiting = buffer.pop("frames_waiting", None)
        self.set_incremental_state(incremental_state, "stream", buffer)
        if waiting is None or waiting.size(0) == 0:
            return None
        return self._encode_frames(waiting, incremental_state)

    def _stream_buffer(self, incremental_state: Dict) -> Dict[str, Optional[Tensor]]:
        return self.get_incremental_state(incremental_state, "stream") or {}

    def _encode_frames(self, x: Tensor, incremental_state: Dict) -> Tensor:
        """Subsampled frames ``(n, B, C)`` of a stream -> encoder states ``(n, B, C)``."""
        buffer = self._stream_buffer(incremental_state)
        encoded = buffer.get("frames_encoded", torch.zeros(1, dtype=torch.long))
        start = int(encoded)
        buffer["frames_encoded"] = encoded + x.size(0)
        self.set_incremental_state(incremental_state, "stream", buffer)
        if x.size(0) == 0:
            return x
        positions = stream_position_rows(self.embed_positions, start, x.size(0), x.size(1))
        x = self.dropout_module(self.embed_scale * x + positions.transpose(0, 1))
        for layer in self.layers:
            x = layer.forward_incremental(x, incremental_state)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order: Tensor):
        return {
            "encoder_out": [x.index_select(1, new_order) for x in encoder_out["encoder_out"]],
            "encoder_padding_mask": [
                x.index_select(0, new_order) for x in encoder_out["encoder_padding_mask"]
            ],
            "encoder_embedding": [],
            "encoder_states": [x.index_select(1, new_order)
                               for x in encoder_out["encoder_states"]],
            "src_tokens": [],
            "src_lengths": [],
        }


def load_pretrained_decoder(decoder: nn.Module, checkpoint: Path, tgt_dict: Dictionary) -> None:
    """Copy the decoder of a fairseq ``checkpoint`` (e.g. a text-to-text wait-k model) into
    ``decoder``. Refused, naming ``--load-pretrained-decoder-from``, unless both decoders have
    the same parameters and shapes and the checkpoint's target dictionary (``dict.<tgt>.txt``
    in its task's data folder) is ``tgt_dict``, symbol for symbol."""
    flag = f"--load-pretrained-decoder-from {checkpoint}"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{flag}: no such checkpoint")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))
    theirs = {key.removeprefix("decoder."): value for key, value in state["model"].items()
              if key.startswith("decoder.")}
    ours = decoder.state_dict()
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or extra:
        raise ValueError(
            f"{flag}: its decoder has other parameters than this model's (missing there: "
            f"{', '.join(missing[:3]) or '-'}; not here: {', '.join(extra[:3]) or '-'}); the "
            "two need the same layers, attention types and feature maps, and a pre-norm "
            "decoder (--decoder-normalize-before)")
    for key, value in ours.items():
        if value.shape != theirs[key].shape:
            raise ValueError(f"{flag}: decoder.{key} is {tuple(theirs[key].shape)} there, "
                             f"{tuple(value.shape)} here; the decoders' sizes must match")
    task = state["cfg"]["task"]
    data = Path(str(task.get("data")).split(":")[0])
    if not data.is_dir():
        raise FileNotFoundError(f"{flag}: its task data {data} (holding its target "
                                "dictionary, to check against this model's) is not there")
    # fairseq's translation task infers the language pair from its data when not given
    target = task.get("target_lang") or infer_language_pair(str(data))[1]
    if not target:
        raise ValueError(f"{flag}: neither its task ({task.get('_name')}) nor its data {data} "
                         "names a target language; a text-to-text translation checkpoint is "
                         "expected")
    dictionary = data / f"dict.{target}.txt"
    if not dictionary.is_file():
        raise FileNotFoundError(f"{flag}: its target dictionary {dictionary} (the checkpoint's "
                                "task data) is not there to check against this model's")
    if Dictionary.load(str(dictionary)).symbols != tgt_dict.symbols:
        raise ValueError(f"{flag}: its target dictionary {dictionary} differs from this "
                         "model's; prepare the speech data with --st-vocab-from the "
                         "text-to-text data")
    decoder.load_state_dict(theirs)


@register_model("leapformer_s2t_transformer")
class LeaPformerS2TTransformerModel(LeaPAttentionBlocks, FairseqEncoderDecoderModel):
    """Speech-to-text transformer with LeaP (or cosFormer, linear, Hedgehog, softmax) attention
    blocks."""

    @staticmethod
    def add_args(parser):
        S2TTransformerModel.add_args(parser)
        add_attention_args(parser)
        parser.add_argument("--load-pretrained-decoder-from", metavar="CHECKPOINT",
                            help="initialise the decoder from this checkpoint's decoder, e.g. "
                                 "a text-to-text wait-k model with the same decoder "
                                 "hyper-parameters (pre-norm), trained on the same target "
                                 "dictionary (s2t_recipe.py prepare --st-vocab-from)")

    subsampler_class = Conv1dSubsampler

    def __init__(self, encoder: LeaPS2TEncoder, decoder: nn.Module,
                 ctc_projection: Optional[nn.Linear] = None):
        super().__init__(encoder, decoder)
        # CTC on the encoder states (label_smoothed_cross_entropy_with_ctc): a linear layer to
        # the target vocabulary, whose index 0 (<s>, never a target) is CTC's blank. It sits
        # beside the encoder, not in it, so an ST model takes the encoder without it.
        self.ctc_projection = ctc_projection

    @classmethod
    def build_subsampler(cls, cfg: TransformerConfig) -> nn.Module:
        return cls.subsampler_class(
            cfg.input_feat_per_channel * cfg.input_channels, cfg.conv_channels,
            cfg.encoder.embed_dim, [int(k) for k in cfg.conv_kernel_sizes.split(",")],
        )

    @classmethod
    def build_encoder(cls, cfg: TransformerConfig) -> LeaPS2TEncoder:
        """The encoder, initialised from ``--load-pretrained-encoder-from`` when given
        (``build_model`` then records the option as consumed)."""
        encoder = LeaPS2TEncoder(cfg, cls.encoder_attention(cfg), cls.build_subsampler(cfg))
        pretrained = getattr(cfg, "load_pretrained_encoder_from", None)
        if pretrained:
            if not Path(pretrained).is_file():
                raise FileNotFoundError(
                    f"--load-pretrained-encoder-from: no such checkpoint {pretrained}")
            encoder = checkpoint_utils.load_pretrained_component_from_model(
                component=encoder, checkpoint=pretrained)
            logger.info(f"loaded the encoder from {pretrained}")
        return encoder

    @classmethod
    def build_model(cls, args, task):
        """As fairseq's transformer builds itself: args -> ``TransformerConfig`` ->
        ``build_encoder`` and ``build_decoder``.

        ``--load-pretrained-encoder-from`` and ``--load-pretrained-decoder-from`` are consumed:
        once the encoder or decoder is loaded, the option is cleared from ``args`` (the args the
        trainer saves in every checkpoint) and kept as ``encoder_initialized_from`` or
        ``decoder_initialized_from``
        (:func:`~leapformer_fairseq.compat.record_initialisation`), so loading the checkpoint
        later never reads the pretrained file again.
        """
        s2t_base(args)
        cls.prepare_args(args)
        cfg = TransformerConfig.from_namespace(as_namespace(args))
        encoder = cls.build_encoder(cfg)
        tgt_dict = task.target_dictionary
        embed_tokens = Embedding(len(tgt_dict), cfg.decoder.embed_dim, tgt_dict.pad())
        decoder = cls.build_decoder(cfg, tgt_dict, embed_tokens)
        pretrained = getattr(args, "load_pretrained_decoder_from", None)
        if pretrained:
            load_pretrained_decoder(decoder, Path(pretrained), tgt_dict)
            logger.info(f"loaded the decoder from {pretrained}")
        record_initialisation(args)
        # fairseq's criterion option, in the model's args when that criterion trains it
        ctc = getattr(args, "ctc_weight", 0.0) > 0.0
        return cls(encoder, decoder,
                   nn.Linear(cfg.encoder.embed_dim, len(tgt_dict)) if ctc else None)

    def forward(self, src_tokens, src_lengths, prev_output_tokens):
        encoder_out = self.encoder(src_tokens=src_tokens, src_lengths=src_lengths)
        logits, extra = self.decoder(prev_output_tokens=prev_output_tokens,
                                     encoder_out=encoder_out)
        if self.ctc_projection is not None:
            extra["encoder_out"] = encoder_out  # for get_ctc_output
        return logits, extra

    def get_ctc_output(self, net_output: Tuple[Tensor, Dict],
                       sample: Optional[Dict] = None) -> Tuple[Tensor, Tensor]:
        """CTC log-probabilities ``(T', B, V)`` (float32) of the encoder states of a forward
        pass and their lengths ``(B,)``; needs ``--ctc-weight`` > 0 at build time."""
        if self.ctc_projection is None:
            raise ValueError("get_ctc_output: this model has no CTC layer; train it with "
                             "--criterion label_smoothed_cross_entropy_with_ctc and "
                             "--ctc-weight > 0")
        encoder_out = net_output[1]["encoder_out"]
        states = encoder_out["encoder_out"][0]
        log_probs = F.log_softmax(self.ctc_projection(states).float(), dim=-1)
        lengths = states.new_full((states.shape[1],), states.shape[0], dtype=torch.long)
        if encoder_out["encoder_padding_mask"]:
            lengths = lengths - encoder_out["encoder_padding_mask"][0].sum(dim=-1)
        return log_probs, lengths

    def get_ctc_target(self, sample: Dict) -> Tuple[Tensor, Tensor]:
        """CTC targets: the targets without their final </s>, ``(B, L - 1)`` (right padded:
        the longest one's </s> is the last column), and lengths ``(B,)``."""
        return sample["target"][:, :-1], sample["target_lengths"] - 1


@register_model("leapformer_s2t_waitk")
class LeaPformerS2TWaitkModel(LeaPformerS2TTransformerModel):
    """Simultaneous speech-to-text: causal subsampler and encoder, wait-k cross-attention on
    units of ``--frames-per-unit`` encoder frames."""

    subsampler_class = CausalConv1dSubsampler
    renamed_args = {"fixed_pre_decision_ratio": "frames_per_unit",
                    "chunk_causal_encoder": "unit_causal_encoder"}

    @staticmethod
    def add_args(parser):
        LeaPformerS2TTransformerModel.add_args(parser)
        parser.add_argument("--waitk-lagging", type=waitk_lagging_value, metavar="K",
                            help="wait-k lagging in source units (required, >= 1). Several (a "
                                 "range 1-9, a list 1,3,5): multi-path training, k drawn per "
                                 "batch")
        parser.add_argument("--frames-per-unit", "--fixed-pre-decision-ratio",
                            dest="frames_per_unit", type=positive(int, "--frames-per-unit"),
                            metavar="N",
                            help="encoder frames (40 ms each) per source unit, the step of the "
                                 "wait-k schedule (default 9: 360 ms). Old name: "
                                 "--fixed-pre-decision-ratio")
        parser.add_argument("--unit-causal-encoder", "--chunk-causal-encoder",
                            dest="unit_causal_encoder", action="store_true",
                            help="encoder self-attention sees its whole unit of N frames and the "
                                 "units before (default: causal). Old name: "
                                 "--chunk-causal-encoder")

    @classmethod
    def prepare_args(cls, args: argparse.Namespace) -> None:
        """Also: ``--frames-per-unit`` unset is 9, and ``--waitk-lagging`` is required."""
        super().prepare_args(args)
        units = getattr(args, "frames_per_unit", None)
        args.frames_per_unit = 9 if units is None else check_positive("--frames-per-unit", units)
        check_waitk_lagging(args)

    @classmethod
    def encoder_attention(cls, cfg: TransformerConfig) -> AttentionConfig:
        unit_causal = bool(getattr(cfg, "unit_causal_encoder", False))
        return attention_config(cfg, "encoder", causal=True, unit_causal=unit_causal,
                                frames_per_unit=cfg.frames_per_unit if unit_causal else 1)

    @classmethod
    def cross_attention(cls, cfg: TransformerConfig) -> AttentionConfig:
        return waitk_cross_attention(cfg, frames_per_unit=cfg.frames_per_unit)

    def start_stream(self, cmvn: Optional[GlobalCMVN] = None, **options) -> SpeechWaitkStream:
        """A simultaneous wait-k greedy decoding of one utterance (see
        :class:`~leapformer_fairseq.models.streaming.SpeechWaitkStream`)."""
        return SpeechWaitkStream(self, cmvn=cmvn, **options)


def _architecture(embed_dim: int, ffn_dim: int, encoder_layers: int, decoder_layers: int,
                  heads: int, conv_channels: int):
    """A named hyper-parameter set; explicit command-line values take precedence."""

    def set_defaults(args):
        args.encoder_embed_dim = getattr(args, "encoder_embed_dim", embed_dim)
        args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", ffn_dim)
        args.encoder_layers = getattr(args, "encoder_layers", encoder_layers)
        args.encoder_attention_heads = getattr(args, "encoder_attention_heads", heads)
        args.decoder_layers = getattr(args, "decoder_layers", decoder_layers)
        args.decoder_attention_heads = getattr(args, "decoder_attention_heads", heads)
        args.conv_channels = getattr(args, "conv_channels", conv_channels)
        args.conv_kernel_sizes = getattr(args, "conv_kernel_sizes", "3,3")
        args.encoder_normalize_before = getattr(args, "encoder_normalize_before", True)
        args.decoder_normalize_before = getattr(args, "decoder_normalize_before", True)
        s2t_base(args)

    return set_defaults


# _base follows docs/math.md §6: d 256, 12 + 6 layers, FFN 2048, 8 heads (head dim 32), pre-norm,
# 2 x Conv(3, stride 2); LeaP hidden 8 is head_dim / --leap-factor 4.
S2T_ARCHITECTURES = {
    "tiny": _architecture(64, 128, 2, 1, 2, conv_channels=64),
    "small": _architecture(256, 1024, 6, 3, 4, conv_channels=256),
    "base": _architecture(256, 2048, 12, 6, 8, conv_channels=1024),
}

for _model in ("leapformer_s2t_transformer", "leapformer_s2t_waitk"):
    register_model_architecture(_model, _model)(S2T_ARCHITECTURES["base"])
    for _size, _set_defaults in S2T_ARCHITECTURES.items():
        register_model_architecture(_model, f"{_model}_{_size}")(_set_defaults)
