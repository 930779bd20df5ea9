"""Command-line options of LeaP attention and their resolution into per-block settings."""
import argparse
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

from leapformer_fairseq.modules import ATTN_TYPES, LEAP_FEATURE_MAPS, LeaPMultiheadAttention

# option -> (flag, default): unset keeps the default; an explicit value must be positive
POSITIVE_OPTIONS = {
    "leap_factor": ("--leap-factor", 4),
    "leap_eps": ("--leap-eps", 0.1),
    "cosformer_max_positions": ("--cosformer-max-positions", 1024),
}

# options whose default changed -> what args saved without them (or with None) mean: the
# parser's default now is hedgehog, so only checkpoints saved before that lack the option
SAVED_DEFAULTS = {"leap_feature_map": "relu"}

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
    leap_input_norm: bool = False
    leap_feature_map: str = "relu"
    eps: float = 0.1
    cosformer_max_positions: int = 1024
    causal: bool = False
    frames_per_unit: int = 1
    waitk_lagging: Optional[int] = None
    unit_causal: bool = False
    # multi-path wait-k: the k values training draws from (empty: one k, waitk_lagging)
    waitk_train_lags: Tuple[int, ...] = ()
    # training passes compute the feature map through torch.compile
    compile_feature_map: bool = False

    def build(self, embed_dim: int, num_heads: int, **kwargs) -> LeaPMultiheadAttention:
        return LeaPMultiheadAttention(
            embed_dim, num_heads, attn_type=self.attn_type, leap_factor=self.leap_factor,
            leap_input_norm=self.leap_input_norm, leap_feature_map=self.leap_feature_map,
            eps=self.eps, cosformer_max_positions=self.cosformer_max_positions,
            causal=self.causal, frames_per_unit=self.frames_per_unit,
            waitk_lagging=self.waitk_lagging, unit_causal=self.unit_causal,
            compile_feature_map=self.compile_feature_map, **kwargs,
        )


def check_positive(flag: str, value: Union[int, float]) -> Union[int, float]:
    """``value`` if it is > 0; otherwise a ``ValueError`` naming ``flag``."""
    if not value > 0:
        raise ValueError(f"{flag} must be > 0, got {value}")
    return value


def positive(kind: type, flag: str) -> Callable[[str], Union[int, float]]:
    """An argparse ``type`` that refuses values <= 0 with a message naming ``flag``."""

    def parse(text: str) -> Union[int, float]:
        try:
            return check_positive(flag, kind(text))
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def add_attention_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LeaP attention")
    for block, (option, _) in ATTENTION_BLOCKS.items():
        group.add_argument(
            "--" + option.replace("_", "-"), choices=ATTN_TYPES, default=None,
            help=f"attention of the {block} blocks (default: leap)",
        )
    group.add_argument("--leap-factor", type=positive(int, "--leap-factor"), metavar="R",
                       help="LeaP MLP hidden size is head_dim // R (default 4)")
    group.add_argument("--leap-input-norm", action="store_true",
                       help="layer-normalise the LeaP MLPs' input (the ReLU features of each "
                            "head) so the proportions can spread (default: off, as saved "
                            "checkpoints without the option were trained)")
    group.add_argument("--leap-feature-map", choices=LEAP_FEATURE_MAPS, default="hedgehog",
                       help="the features LeaP re-weights: hedgehog (Hedgehog's learned "
                            "softmax features; twice the recurrent state of relu), or relu (the "
                            "paper's) (default: hedgehog; a checkpoint saved without the option "
                            "was trained with relu, and keeps it)")
    group.add_argument("--leap-eps", type=positive(float, "--leap-eps"), metavar="EPS",
                       help="denominator clamp max(sum_j s_ij, EPS) of the linear types "
                            "(default 0.1)")
    group.add_argument("--cosformer-max-positions",
                       type=positive(int, "--cosformer-max-positions"), metavar="M",
                       help="the fixed M of cosFormer's p_i = i / M (default 1024)")
    group.add_argument("--compile-feature-map", action="store_true",
                       help="training passes compute the linear types' feature maps (features, "
                            "LeaP's MLPs, the sin/cos re-weighting) through torch.compile: "
                            "fewer, fused kernels, the same numbers; compiles on the first "
                            "update (tens of seconds on a CPU), needs a C++ compiler (CPU) or "
                            "Triton (GPU), and warns once and runs eagerly where compilation "
                            "fails. Evaluation and decoding stay eager (default: off)")
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
    an error. Unset ``--leap-factor``, ``--leap-eps`` and ``--cosformer-max-positions`` take
    their defaults; an explicit value <= 0 is an error naming the flag. Unset options of
    :data:`SAVED_DEFAULTS` (args saved before their default changed) take the old default.
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
    for option, (flag, default) in POSITIVE_OPTIONS.items():
        value = getattr(args, option, None)
        setattr(args, option, default if value is None else check_positive(flag, value))
    for option, saved in SAVED_DEFAULTS.items():
        if getattr(args, option, None) is None:
            setattr(args, option, saved)


def attention_config(
    args: argparse.Namespace, block: str, causal: bool = False, frames_per_unit: int = 1,
    waitk_lagging: Optional[int] = None, unit_causal: bool = False,
    waitk_train_lags: Tuple[int, ...] = (),
) -> AttentionConfig:
    """The settings of one block (``encoder``, ``decoder`` or ``cross``) from resolved args
    (a Namespace, or the ``TransformerConfig`` fairseq makes of one)."""
    return AttentionConfig(
        attn_type=getattr(args, ATTENTION_BLOCKS[block][0]),
        leap_factor=args.leap_factor,
        leap_input_norm=bool(getattr(args, "leap_input_norm", False)),
        leap_feature_map=args.leap_feature_map,
        eps=args.leap_eps,
        cosformer_max_positions=args.cosformer_max_positions,
        causal=causal,
        frames_per_unit=frames_per_unit,
        waitk_lagging=waitk_lagging,
        unit_causal=unit_causal,
        waitk_train_lags=waitk_train_lags,
        compile_feature_map=bool(getattr(args, "compile_feature_map", False)),
    )
