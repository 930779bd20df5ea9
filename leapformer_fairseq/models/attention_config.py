"""Command-line options of LeaP attention and their resolution into per-block settings."""
import argparse
from dataclasses import dataclass
from typing import Optional

from leapformer_fairseq.modules import ATTN_TYPES, LeaPMultiheadAttention

# block name -> (option for its attention type, the reference implementation's flag)
ATTENTION_BLOCKS = {
    "encoder": ("encoder_attn_type", "enc_leapformer_enable"),
    "decoder": ("decoder_attn_type", "dec_sa_leapformer_enable"),
    "cross": ("cross_attn_type", "dec_ca_leapformer_enable"),
}


@dataclass
class AttentionConfig:
    """How to build one kind of attention block."""

    attn_type: str
    leap_factor: int = 4
    eps: float = 0.1
    cosformer_max_positions: int = 1024
    causal: bool = False
    waitk_lagging: Optional[int] = None
    waitk_stride: int = 1
    causal_chunk: int = 1

    def build(self, embed_dim: int, num_heads: int, **kwargs) -> LeaPMultiheadAttention:
        return LeaPMultiheadAttention(
            embed_dim, num_heads, attn_type=self.attn_type, leap_factor=self.leap_factor,
            eps=self.eps, cosformer_max_positions=self.cosformer_max_positions,
            causal=self.causal, waitk_lagging=self.waitk_lagging, waitk_stride=self.waitk_stride,
            causal_chunk=self.causal_chunk, **kwargs,
        )


def add_attention_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LeaP attention")
    for block, (option, _) in ATTENTION_BLOCKS.items():
        group.add_argument(
            "--" + option.replace("_", "-"), choices=ATTN_TYPES, default=None,
            help=f"attention of the {block} blocks (default: leap)",
        )
    group.add_argument("--leap-factor", type=int, metavar="R",
                       help="LeaP MLP hidden size is head_dim // R (default 4)")
    group.add_argument("--leap-eps", type=float, metavar="EPS",
                       help="denominator clamp max(sum_j s_ij, EPS) of the linear types "
                            "(default 0.1)")
    group.add_argument("--cosformer-max-positions", type=int, metavar="M",
                       help="the fixed M of cosFormer's p_i = i / M (default 1024)")
    for block, (_, flag) in ATTENTION_BLOCKS.items():
        group.add_argument(
            "--" + flag.replace("_", "-"), action="store_true",
            help=f"reference-implementation flag: LeaP in the {block} blocks; once any of these "
                 "flags is given, the blocks without one use softmax",
        )


def resolve_attention_types(args: argparse.Namespace) -> None:
    """Fill ``args.{encoder,decoder,cross}_attn_type`` from the options (idempotent).

    Without the reference flags every unset type is ``leap``. With any of them, flagged blocks
    are ``leap`` and the others ``softmax``; an explicit ``--*-attn-type`` that disagrees is
    an error.
    """
    flagged = {block: bool(getattr(args, flag, False))
               for block, (_, flag) in ATTENTION_BLOCKS.items()}
    for block, (option, flag) in ATTENTION_BLOCKS.items():
        explicit = getattr(args, option, None)
        if not any(flagged.values()):
            setattr(args, option, explicit or "leap")
            continue
        implied = "leap" if flagged[block] else "softmax"
        if explicit is not None and explicit != implied:
            raise ValueError(
                f"--{option.replace('_', '-')} {explicit} contradicts the reference flags "
                f"(--{flag.replace('_', '-')} {'given' if flagged[block] else 'not given'}); "
                "use one style or the other"
            )
        setattr(args, option, implied)
    args.leap_factor = getattr(args, "leap_factor", None) or 4
    args.leap_eps = getattr(args, "leap_eps", None) or 0.1
    args.cosformer_max_positions = getattr(args, "cosformer_max_positions", None) or 1024


def attention_config(
    args: argparse.Namespace, block: str, causal: bool = False,
    waitk_lagging: Optional[int] = None, waitk_stride: int = 1, causal_chunk: int = 1,
) -> AttentionConfig:
    """The settings of one block (``encoder``, ``decoder`` or ``cross``) from resolved args."""
    return AttentionConfig(
        attn_type=getattr(args, ATTENTION_BLOCKS[block][0]),
        leap_factor=args.leap_factor,
        eps=args.leap_eps,
        cosformer_max_positions=args.cosformer_max_positions,
        causal=causal,
        waitk_lagging=waitk_lagging,
        waitk_stride=waitk_stride,
        causal_chunk=causal_chunk,
    )
