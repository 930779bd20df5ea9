"""Registered encoder-decoder models with LeaP attention (text to text).

``leapformer_transformer``: offline encoder-decoder, bidirectional encoder.
``leapformer_waitk_transformer``: simultaneous; causal encoder and wait-k cross-attention, so
target token i attends source tokens ``0 .. i + k - 1`` in training exactly as in streaming.
"""
import argparse
from contextlib import contextmanager
from typing import Dict, Iterator, List, Mapping, Tuple, Union

import torch
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
)
from fairseq.models.transformer.transformer_legacy import base_architecture
from fairseq.modules import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor, nn

from leapformer_fairseq.compat import as_namespace, rename_args
from leapformer_fairseq.modules import (
    StreamingSinusoidalPositionalEmbedding,
    sinusoidal_embeddings,
)

from .attention_config import (
    AttentionConfig,
    add_attention_args,
    attention_config,
    resolve_attention_types,
)
from .streaming import WaitkStream


def _wrap_layer(layer: nn.Module, cfg: TransformerConfig) -> nn.Module:
    """fairseq's activation checkpointing and FSDP wrapping, as for its own layers."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


def stream_position_rows(embed_positions: nn.Module, start: int, count: int,
                         batch_size: int) -> Tensor:
    """Positional embeddings of stream positions ``start .. start + count - 1``,
    ``(batch_size, count, C)``: the rows fairseq's ``embed_positions`` gives a sequence without
    padding. O(count) work and nothing kept, however long the stream (fairseq's sinusoidal
    module is not called: it would grow its own table to the stream's length).
    ``count >= 1``.

    Raises ``ValueError`` for a position a learned embedding has no row for.
    """
    positions = torch.arange(start, start + count)
    if isinstance(embed_positions, LearnedPositionalEmbedding):
        if start + count > embed_positions.max_positions:
            raise ValueError(
                f"source position {max(start, embed_positions.max_positions)} is past "
                f"--max-source-positions {embed_positions.max_positions} (learned positional "
                "embeddings)")
        rows = positions + embed_positions.padding_idx + 1
        embeddings = embed_positions.weight[rows.to(embed_positions.weight.device)]
    elif isinstance(embed_positions, SinusoidalPositionalEmbedding):
        embeddings = sinusoidal_embeddings(embed_positions, positions)
    else:
        raise TypeError(f"no stream positions for {type(embed_positions).__name__}")
    return embeddings.unsqueeze(0).expand(batch_size, -1, -1)


class LeaPEncoderLayer(TransformerEncoderLayerBase):
    def __init__(self, cfg: TransformerConfig, self_attention: AttentionConfig, return_fc=False):
        self.self_attention_config = self_attention
        super().__init__(cfg, return_fc=return_fc)

    def build_self_attention(self, embed_dim, cfg):
        return self.self_attention_config.build(
            embed_dim, cfg.encoder.attention_heads, dropout=cfg.attention_dropout,
            self_attention=True,
        )

    def forward_incremental(self, x: Tensor, incremental_state: Dict) -> Tensor:
        """The layer on new frames ``(n, B, C)`` of a causal encoder; self-attention advances
        its recurrent state (or cache) in ``incremental_state``. Same math as ``forward``."""
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(query=x, key=x, value=x, incremental_state=incremental_state,
                              need_weights=False)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x = self.fc2(self.activation_dropout_module(self.activation_fn(self.fc1(x))))
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x


class LeaPDecoderLayer(TransformerDecoderLayerBase):
    def __init__(
        self,
        cfg: TransformerConfig,
        self_attention: AttentionConfig,
        cross_attention: AttentionConfig,
        no_encoder_attn: bool = False,
    ):
        if cfg.cross_self_attention:
            raise ValueError("--cross-self-attention is not supported with LeaP attention")
        self.self_attention_config = self_attention
        self.cross_attention_config = cross_attention
        super().__init__(cfg, no_encoder_attn)

    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        return self.self_attention_config.build(
            embed_dim, cfg.decoder.attention_heads, dropout=cfg.attention_dropout,
            self_attention=True, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
        )

    def build_encoder_attention(self, embed_dim, cfg):
        return self.cross_attention_config.build(
            embed_dim, cfg.decoder.attention_heads, kdim=cfg.encoder.embed_dim,
            vdim=cfg.encoder.embed_dim, dropout=cfg.attention_dropout,
            encoder_decoder_attention=True,
        )


class LeaPTransformerEncoder(TransformerEncoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, self_attention: AttentionConfig):
        self.self_attention_config = self_attention
        super().__init__(cfg, dictionary, embed_tokens)

    def build_encoder_layer(self, cfg):
        return _wrap_layer(
            LeaPEncoderLayer(cfg, self.self_attention_config, return_fc=self.return_fc), cfg
        )

    def forward_new_tokens(self, tokens: Tensor, start: int, incremental_state: Dict) -> Tensor:
        """Encode ``n`` new source tokens ``(B, n)`` at positions ``start ..`` of a causal encoder.

        Work is O(n) per call: each layer advances its state in ``incremental_state``. Returns
        ``(n, B, C)``, equal to the rows ``start ..`` of ``forward`` on the whole prefix.
        """
        if not self.self_attention_config.causal:
            raise ValueError("streaming needs a causal encoder (leapformer_waitk_transformer)")
        x = self.embed_scale * self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + stream_position_rows(self.embed_positions, start, tokens.size(1),
                                         tokens.size(0))
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x).transpose(0, 1)
        for layer in self.layers:
            x = layer.forward_incremental(x, incremental_state)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x


class LeaPTransformerDecoder(TransformerDecoderBase):
    def __init__(
        self,
        cfg,
        dictionary,
        embed_tokens,
        self_attention: AttentionConfig,
        cross_attention: AttentionConfig,
        no_encoder_attn: bool = False,
    ):
        self.self_attention_config = self_attention
        self.cross_attention_config = cross_attention
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        if isinstance(self.embed_positions, SinusoidalPositionalEmbedding):
            # incremental steps compute their row instead of growing fairseq's table
            self.embed_positions = StreamingSinusoidalPositionalEmbedding(
                self.embed_positions.embedding_dim, self.embed_positions.padding_idx,
                init_size=self.embed_positions.weights.size(0))

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        layer = LeaPDecoderLayer(
            cfg, self.self_attention_config, self.cross_attention_config, no_encoder_attn
        )
        return _wrap_layer(layer, cfg)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        """fairseq's; a multi-path wait-k decoder in training draws the k of this batch
        uniformly from ``--waitk-lagging``'s (with torch's generator, which fairseq seeds per
        update, so resumed training draws the same k)."""
        lags = self.cross_attention_config.waitk_train_lags
        if not (self.training and lags and incremental_state is None):
            return super().forward(prev_output_tokens, encoder_out, incremental_state, **kwargs)
        with self.lagging(lags[int(torch.randint(len(lags), ()))]):
            return super().forward(prev_output_tokens, encoder_out, incremental_state, **kwargs)

    @contextmanager
    def lagging(self, waitk: int) -> Iterator[None]:
        """Parallel forwards inside use wait-``waitk`` cross-attention (streaming takes its k
        as an argument)."""
        blocks = [layer.encoder_attn for layer in self.layers]
        for block in blocks:
            block.waitk_lagging = waitk
        try:
            yield
        finally:
            for block in blocks:
                block.waitk_lagging = self.cross_attention_config.waitk_lagging

    def extend_source(self, incremental_state: Dict, encoder_states: Tensor) -> None:
        """Make new encoder states ``(n, B, C)`` visible to every layer's cross-attention."""
        for layer in self.layers:
            layer.encoder_attn.extend_source(incremental_state, encoder_states, encoder_states)


class LeaPAttentionBlocks:
    """How both model families (text and speech) build their attention blocks.

    ``build_model`` passes the command-line args through :meth:`prepare_args` (renamed options,
    attention types, defaults and checks), then makes fairseq's ``TransformerConfig`` of them
    (of a Namespace, :func:`~leapformer_fairseq.compat.as_namespace`), which keeps every option
    of ours as an attribute. ``build_encoder`` and ``build_decoder`` take that config and read
    each block's :class:`AttentionConfig` from the three methods below, which a model family
    overrides to make its encoder causal or its cross-attention wait-k. No state outside the
    arguments.
    """

    # old option name -> its name now (see upgrade_args)
    renamed_args: Mapping[str, str] = {}

    @classmethod
    def upgrade_args(cls, args: argparse.Namespace) -> None:
        """Rename, in place, the options of args saved under an earlier name (checkpoints)."""
        rename_args(args, cls.renamed_args)

    @classmethod
    def prepare_args(cls, args: argparse.Namespace) -> None:
        cls.upgrade_args(args)
        resolve_attention_types(args)

    @classmethod
    def encoder_attention(cls, cfg: TransformerConfig) -> AttentionConfig:
        return attention_config(cfg, "encoder")

    @classmethod
    def decoder_attention(cls, cfg: TransformerConfig) -> AttentionConfig:
        return attention_config(cfg, "decoder", causal=True)

    @classmethod
    def cross_attention(cls, cfg: TransformerConfig) -> AttentionConfig:
        return attention_config(cfg, "cross")

    @classmethod
    def build_decoder(cls, cfg: TransformerConfig, tgt_dict, embed_tokens):
        return LeaPTransformerDecoder(
            cfg, tgt_dict, embed_tokens, cls.decoder_attention(cfg), cls.cross_attention(cfg),
            no_encoder_attn=cfg.no_cross_attention,
        )


WAITK_FORMS = "an integer >= 1, a range such as 1-9 or a list such as 1,3,5"


def waitk_lagging_value(text: str) -> Union[int, str]:
    """The argparse type of ``--waitk-lagging``: one k as an int (as checkpoints saved it before
    multi-path), a set as its text; :func:`waitk_lags` checks either."""
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def waitk_lags(value: Union[int, str, None]) -> Tuple[int, ...]:
    """The k values of ``--waitk-lagging``, ascending: ``3`` -> ``(3,)``, ``"1-9"`` -> 1 .. 9,
    ``"1,3,5"``, ``"1-3,7"``; anything else (a k < 1, a repeated k, an empty range) is a
    ``ValueError`` naming the option."""
    problem = ValueError(f"--waitk-lagging must be {WAITK_FORMS}; got {value}")
    if isinstance(value, int):
        if value < 1:
            raise problem
        return (value,)
    if not isinstance(value, str) or not value:
        raise problem
    lags: List[int] = []
    for part in value.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise problem
        start, end = int(first), int(last) if dash else int(first)
        if start < 1 or end < start:
            raise problem
        lags.extend(range(start, end + 1))
    if len(set(lags)) != len(lags):
        raise problem
    return tuple(sorted(lags))


def check_waitk_lagging(args: argparse.Namespace) -> Tuple[int, ...]:
    """The k values of ``--waitk-lagging``, which a wait-k model requires, or a ``ValueError``
    naming it."""
    return waitk_lags(getattr(args, "waitk_lagging", None))


def waitk_cross_attention(cfg: TransformerConfig, **options) -> AttentionConfig:
    """The wait-k cross-attention of ``cfg``'s ``--waitk-lagging``: one k, or for several
    (multi-path) the k that training samples from and the middle one for everything else."""
    lags = waitk_lags(cfg.waitk_lagging)
    return attention_config(cfg, "cross", waitk_lagging=lags[len(lags) // 2],
                            waitk_train_lags=lags if len(lags) > 1 else (), **options)


@register_model("leapformer_transformer")
class LeaPformerTransformerModel(LeaPAttentionBlocks, TransformerModel):
    """fairseq's transformer with LeaP (or cosFormer, linear, Hedgehog, softmax) attention
    blocks."""

    @staticmethod
    def add_args(parser):
        TransformerModel.add_args(parser)
        add_attention_args(parser)

    @classmethod
    def build_model(cls, args, task):
        cls.prepare_args(args)
        # fairseq's, which makes the TransformerConfig and calls build_encoder/decoder
        return super().build_model(as_namespace(args), task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return LeaPTransformerEncoder(cfg, src_dict, embed_tokens, cls.encoder_attention(cfg))


@register_model("leapformer_waitk_transformer")
class LeaPformerWaitkTransformerModel(LeaPformerTransformerModel):
    """Simultaneous: causal encoder, wait-k cross-attention (``--waitk-lagging k``)."""

    @staticmethod
    def add_args(parser):
        LeaPformerTransformerModel.add_args(parser)
        parser.add_argument("--waitk-lagging", type=waitk_lagging_value, metavar="K",
                            help="wait-k lagging: target token i sees source tokens "
                                 "0 .. i + K - 1 (required, >= 1). Several (a range 1-9, a "
                                 "list 1,3,5): multi-path training, k drawn per batch")

    @classmethod
    def prepare_args(cls, args: argparse.Namespace) -> None:
        super().prepare_args(args)
        check_waitk_lagging(args)

    @classmethod
    def encoder_attention(cls, cfg: TransformerConfig) -> AttentionConfig:
        return attention_config(cfg, "encoder", causal=True)

    @classmethod
    def cross_attention(cls, cfg: TransformerConfig) -> AttentionConfig:
        return waitk_cross_attention(cfg)

    def start_stream(self, **options) -> "WaitkStream":
        """A simultaneous wait-k greedy decoding of one sentence (see :class:`WaitkStream`)."""
        return WaitkStream(self, **options)


def _architecture(embed_dim: int, ffn_dim: int, layers: int, heads: int):
    """A named hyper-parameter set; explicit command-line values take precedence."""

    def set_defaults(args):
        args.encoder_embed_dim = getattr(args, "encoder_embed_dim", embed_dim)
        args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", ffn_dim)
        args.encoder_layers = getattr(args, "encoder_layers", layers)
        args.encoder_attention_heads = getattr(args, "encoder_attention_heads", heads)
        args.decoder_embed_dim = getattr(args, "decoder_embed_dim", embed_dim)
        args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", ffn_dim)
        args.decoder_layers = getattr(args, "decoder_layers", layers)
        args.decoder_attention_heads = getattr(args, "decoder_attention_heads", heads)
        base_architecture(args)

    return set_defaults


ARCHITECTURES = {
    "tiny": _architecture(embed_dim=32, ffn_dim=64, layers=2, heads=2),
    "small": _architecture(embed_dim=256, ffn_dim=1024, layers=3, heads=4),
    "base": _architecture(embed_dim=512, ffn_dim=2048, layers=6, heads=8),
}

for _model in ("leapformer_transformer", "leapformer_waitk_transformer"):
    register_model_architecture(_model, _model)(ARCHITECTURES["base"])
    for _size, _set_defaults in ARCHITECTURES.items():
        register_model_architecture(_model, f"{_model}_{_size}")(_set_defaults)
