"""Command-line options the SimulEval agents share: the checkpoint, and how its stream decodes."""
from argparse import ArgumentParser, Namespace
from typing import Any, Dict


def add_stream_args(parser: ArgumentParser, unit: str, max_len_a: float) -> None:
    """``--checkpoint``, ``--waitk``, ``--max-len-a``, ``--max-len-b``, ``--threads`` and
    ``--recompute``; ``unit`` names the source units in the help (``pieces``, ``units``)."""
    parser.add_argument("--checkpoint", required=True,
                        help="a simultaneous model checkpoint (leapformer_waitk_transformer* or "
                             "leapformer_s2t_waitk*)")
    parser.add_argument("--waitk", type=int, default=None,
                        help=f"lagging k in source {unit} (default: the model's --waitk-lagging)")
    parser.add_argument("--max-len-a", type=float, default=max_len_a,
                        help=f"once the source has ended, stop at max-len-a * source {unit} + "
                             f"max-len-b target pieces (default {max_len_a})")
    parser.add_argument("--max-len-b", type=int, default=10, help="see --max-len-a (default 10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: one sentence's small steps gain "
                             "nothing from more, and lose much on a busy machine)")
    parser.add_argument("--recompute", action="store_true",
                        help="re-run the encoder (for speech, fbank too) and the decoder over the "
                             "whole prefix at every step (the reference implementation's way), "
                             "for comparison")


def stream_options(args: Namespace) -> Dict[str, Any]:
    """The ``model.start_stream`` options given by :func:`add_stream_args`' flags."""
    return dict(waitk=args.waitk, max_len_a=args.max_len_a, max_len_b=args.max_len_b,
                recompute=args.recompute)
